//! The recording reader against arbitrary bytes: `tcp-trace replay` must turn any file into
//! records or a clear error, never a panic, a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, records)) = tcp_trace::record::read_all(data) {
        // Whatever parses must decode.
        for r in records {
            if let tcp_trace::record::Record::Event(ev) = r {
                let _ = tcp_trace::decode::parse_raw(tcp_trace::decode::event_bytes(&ev));
            }
        }
    }
});
