//! The whole replay pipeline against arbitrary bytes: the recording reader, then decode, owners,
//! flows and their verdicts, reset diagnoses and the report (JSON or text, every view) into a
//! sink. Any recording must come out as output or a clear error, never a panic, a hang or an
//! unbounded allocation. Seeded with real recordings (fuzz/corpus/replay).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcp_trace::{
    record::RecordReader,
    replay::{ReplayOptions, replay},
    report::View,
};

fuzz_target!(|data: &[u8]| {
    let Ok((header, reader)) = RecordReader::open(data) else {
        return;
    };
    // The header's recorded filters choose the --pid gate, its start time the output form, so
    // that every printer is reached (seeds differ in start time; mutations change it).
    let mode = header.recorded_at_unix_ns;
    let view = match mode % 3 {
        0 => View::Both,
        1 => View::Flows,
        _ => View::Events,
    };
    let opts = ReplayOptions {
        json: mode & 4 != 0,
        view,
        pids: header.filters.pids.clone(),
    };
    let _ = replay(&header, reader, opts, std::io::sink(), "fuzz input");
});
