//! The recording format of `tcp-trace record -o FILE` / `tcp-trace replay FILE`: the raw
//! [`Event`]s exactly as the kernel wrote them, framed in small tagged records, behind a JSON
//! header holding the kernel facts needed to interpret them offline (enum names, hooks and their
//! backends, clock offset, filters, sysctls). The byte-by-byte layout and the version policy are
//! in `docs/record-format.md`.
//!
//! The reader is built for replay speed and for fuzzing: buffered, no allocation per record, and
//! every malformed input is a [`RecordError`] naming the byte offset, never a panic.

mod error;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tcp_trace_common::{EVENT_SIZE, EVENT_SIZE_V1, Event};

pub use self::error::RecordError;
use crate::{
    attach::{Backend, HookStatus},
    decode::{event_bytes, parse_raw},
    kernel::btf::KernelFacts,
};

/// The first 8 bytes of every recording.
pub(crate) const MAGIC: &[u8; 8] = b"TCPTRACE";
/// The record layout version this build writes. It reads this one and every older one: format
/// 1 stored 192-byte events (without `owner_cgroup`), read as if that field were 0.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// The largest JSON header a reader accepts (real ones are a few KiB).
pub(crate) const MAX_HEADER_LEN: u32 = 16 << 20;
/// Record tag: one raw [`Event`] (payload: [`EVENT_SIZE`] bytes).
pub(crate) const TAG_EVENT: u8 = b'E';
/// Record tag: events were lost (payload: `u64 ts_ns`, `u64 total_lost_so_far`).
pub(crate) const TAG_LOST: u8 = b'L';
/// Record tag: end of trace (payload: `u64 events_written`, `u64 lost_total`).
pub(crate) const TAG_END: u8 = b'Z';

/// Offset of the JSON header: magic, version, header length.
const HEADER_START: u64 = 16;
/// Tag (u8) + payload length (u16).
const RECORD_HEAD: usize = 3;
const PAIR_LEN: usize = 16;
const BUF_CAPACITY: usize = 64 << 10;

/// The `--pid` / `--port` filters the recording was made with (events outside them are absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filters {
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// The JSON header: what replay needs to interpret the events without the kernel that made them.
/// Fields added later must be `#[serde(default)]` so that older recordings still read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordHeader {
    /// The tcp-trace that made the recording.
    pub tool_version: String,
    /// `uname -r` of the traced kernel.
    pub kernel_release: String,
    /// Wall-clock time when recording started, Unix nanoseconds.
    pub recorded_at_unix_ns: u64,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC when recording started: event `ts_ns` + this = wall
    /// time in Unix nanoseconds (see [`RecordHeader::wall_clock_ns`]).
    pub realtime_minus_monotonic_ns: i64,
    /// The `--backend` requested.
    pub backend: Backend,
    /// Each hook, with the mechanism it was attached by (or why it was not).
    pub hooks: Vec<HookStatus>,
    /// Kernel enum names and hooked signatures, from the traced kernel's BTF.
    pub facts: KernelFacts,
    /// Size of each event record's payload: `tcp_trace_common::EVENT_SIZE` of the recorder.
    pub event_size: u32,
    #[serde(default)]
    pub filters: Filters,
    /// Sysctls the reference model needs (e.g. `net.ipv4.tcp_fin_timeout`), by dotted name.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// Per network namespace (by inode number): what the model is parameterised by there, where
    /// the recorder knew it. Flows in a namespace listed here are judged with these settings,
    /// the others with `sysctls`. Optional (added in tcp-trace 0.1.0, format 2 unchanged).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub netns: BTreeMap<u32, NetnsSettings>,
    /// When the recorder's last hook was attached (CLOCK_MONOTONIC, like event `ts_ns`): flows
    /// that began before it may lack the events of the hooks attached after them. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_ns: Option<u64>,
    /// What the recorder itself judged of each flow (`validate --record-dir` writes it), so a
    /// replay of the recording can be checked against the live verdicts. Optional.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub live_flows: Vec<JudgedFlow>,
}

/// The model's settings in one network namespace: its sysctls, and socket-level facts the
/// recorder knew of (a scenario that set TCP_LINGER2, or closed its listener).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsSettings {
    /// Dotted sysctl name to value, as read inside the namespace.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// TCP_LINGER2 set on the namespace's sockets, seconds (negative: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_linger2_secs: Option<i32>,
    /// Whether a listener was bound to the flows' local port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener_on_port: Option<bool>,
}

/// One flow's verdict, in the terms a replay is compared with the live run by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JudgedFlow {
    pub netns: u32,
    pub local: String,
    pub remote: String,
    /// `conforms`, `diverges` or `incomplete`.
    pub verdict: String,
    /// The model inputs the events were explained by, in order.
    pub inputs: Vec<String>,
    /// Model steps the events verified, and steps the attached hooks could not show.
    pub checked: usize,
    pub unchecked: usize,
}

impl JudgedFlow {
    /// From a flow as `--json` prints it (a `"type": "flow"` line, or a validate scenario's
    /// `flows` entry); None when it is not one.
    pub fn from_flow_json(flow: &serde_json::Value) -> Option<JudgedFlow> {
        let key = &flow["key"];
        let verdict = &flow["verdict"];
        let count = |k: &str| verdict[k].as_array().map_or(0, Vec::len);
        Some(JudgedFlow {
            netns: u32::try_from(key["netns"].as_u64()?).ok()?,
            local: key["local"].as_str()?.to_string(),
            remote: key["remote"].as_str()?.to_string(),
            verdict: verdict["verdict"].as_str()?.to_string(),
            inputs: flow["inputs"]
                .as_array()?
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<_>>()?,
            checked: count("checked"),
            unchecked: count("unchecked"),
        })
    }
}

impl RecordHeader {
    /// A header for a recording starting now on this machine; `sysctls` starts empty.
    pub fn new(
        kernel_release: String,
        backend: Backend,
        hooks: Vec<HookStatus>,
        facts: KernelFacts,
        filters: Filters,
    ) -> Self {
        let recorded_at_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        RecordHeader {
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release,
            recorded_at_unix_ns,
            realtime_minus_monotonic_ns: crate::clock::realtime_minus_monotonic_ns(),
            backend,
            hooks,
            facts,
            event_size: EVENT_SIZE as u32,
            filters,
            sysctls: BTreeMap::new(),
            netns: BTreeMap::new(),
            attached_ns: None,
            live_flows: Vec::new(),
        }
    }

    /// An event timestamp (CLOCK_MONOTONIC ns) as wall-clock Unix nanoseconds.
    #[cfg(test)]
    pub(crate) fn wall_clock_ns(&self, ts_ns: u64) -> u64 {
        ts_ns.saturating_add_signed(self.realtime_minus_monotonic_ns)
    }

    #[cfg(test)]
    pub(crate) fn sysctl(&self, name: &str) -> Option<&str> {
        self.sysctls.get(name).map(String::as_str)
    }
}

/// One record of a recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// One event, exactly as the kernel wrote it (its hook number is known to this build).
    Event(Event),
    /// The ring buffer dropped events: noticed at `ts_ns` (CLOCK_MONOTONIC), `total` lost since
    /// the recording started.
    Lost { ts_ns: u64, total: u64 },
    /// The end-of-trace trailer: the recording was finished and holds `events` events; `lost`
    /// events were lost in all. Always the last record.
    End { events: u64, lost: u64 },
}

/// Writes a recording: header at [`RecordWriter::new`], then records, then the trailer at
/// [`RecordWriter::finish`]. Buffered; call [`RecordWriter::flush`] now and then so that a killed
/// recorder leaves a readable (if unfinished) file.
pub struct RecordWriter<W: Write> {
    out: BufWriter<W>,
    events: u64,
    lost: u64,
}

impl<W: Write> RecordWriter<W> {
    /// Writes the magic, version and `header`.
    pub fn new(w: W, header: &RecordHeader) -> Result<Self> {
        if header.event_size as usize != EVENT_SIZE {
            bail!(
                "recording header says events are {} bytes but they are {EVENT_SIZE}",
                header.event_size
            );
        }
        let json = serde_json::to_vec(header).context("serializing the recording header")?;
        let len = u32::try_from(json.len())
            .ok()
            .filter(|&l| l <= MAX_HEADER_LEN)
            .with_context(|| {
                format!(
                    "recording header is {} bytes, over the {MAX_HEADER_LEN}-byte limit",
                    json.len()
                )
            })?;
        let mut out = BufWriter::with_capacity(BUF_CAPACITY, w);
        out.write_all(MAGIC)
            .and_then(|()| out.write_all(&FORMAT_VERSION.to_le_bytes()))
            .and_then(|()| out.write_all(&len.to_le_bytes()))
            .and_then(|()| out.write_all(&json))
            .context("writing the recording header")?;
        Ok(RecordWriter {
            out,
            events: 0,
            lost: 0,
        })
    }

    /// Appends one event. Events whose hook number this build does not know are refused (the
    /// reader would reject the file).
    pub fn event(&mut self, ev: &Event) -> Result<()> {
        let bytes = event_bytes(ev);
        parse_raw(bytes).context("refusing to record an event")?;
        self.record(TAG_EVENT, bytes)?;
        self.events += 1;
        Ok(())
    }

    /// Appends a lost-events marker: at `ts_ns` (CLOCK_MONOTONIC), `total` events lost so far.
    pub(crate) fn lost(&mut self, ts_ns: u64, total: u64) -> Result<()> {
        self.record(TAG_LOST, &pair(ts_ns, total))?;
        self.lost = total;
        Ok(())
    }

    /// Events written so far.
    pub(crate) fn events_written(&self) -> u64 {
        self.events
    }

    /// Pushes buffered records to the underlying writer.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().context("writing the recording")
    }

    /// Writes the end-of-trace trailer (event count, the last lost total), flushes, and returns
    /// the underlying writer.
    pub fn finish(mut self) -> Result<W> {
        self.record(TAG_END, &pair(self.events, self.lost))?;
        self.out
            .into_inner()
            .map_err(|e| e.into_error())
            .context("writing the recording")
    }

    fn record(&mut self, tag: u8, payload: &[u8]) -> Result<()> {
        let len = u16::try_from(payload.len())
            .with_context(|| format!("a {}-byte record does not fit the format", payload.len()))?;
        let [l0, l1] = len.to_le_bytes();
        self.out
            .write_all(&[tag, l0, l1])
            .and_then(|()| self.out.write_all(payload))
            .context("writing the recording")
    }
}

fn pair(a: u64, b: u64) -> [u8; PAIR_LEN] {
    let mut p = [0; PAIR_LEN];
    p[..8].copy_from_slice(&a.to_le_bytes());
    p[8..].copy_from_slice(&b.to_le_bytes());
    p
}

fn unpair(p: &[u8; PAIR_LEN]) -> (u64, u64) {
    let (a, b) = p.split_at(8);
    let word = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    (word(a), word(b))
}

/// Reads a recording. [`RecordReader::open`] reads and checks the header; iterating yields the
/// records in order, ending after [`Record::End`] or at the first error (after which it yields
/// nothing). A cut-short file yields its complete records, then an error for which
/// [`RecordError::is_cut_short`] is true.
pub struct RecordReader<R: Read> {
    input: BufReader<R>,
    offset: u64,
    records: u64,
    events: u64,
    lost: u64,
    done: bool,
    ended: bool,
    /// Bytes per event record in this file's format version.
    event_size: usize,
}

impl<R: Read> RecordReader<R> {
    /// Reads and checks the magic, version and header. `r` is buffered here.
    pub fn open(r: R) -> Result<(RecordHeader, Self), RecordError> {
        let mut rd = RecordReader {
            input: BufReader::with_capacity(BUF_CAPACITY, r),
            offset: 0,
            records: 0,
            events: 0,
            lost: 0,
            done: false,
            ended: false,
            event_size: EVENT_SIZE,
        };
        let mut magic = [0u8; 8];
        let n = rd.fill(&mut magic)?;
        if n == 0 {
            return Err(RecordError::Empty);
        }
        if magic[..n] != MAGIC[..n] {
            return Err(RecordError::NotARecording {
                found: magic[..n].to_vec(),
            });
        }
        if n < magic.len() {
            return Err(rd.truncated(0, "the magic number", magic.len(), n));
        }
        let version = rd.u32_field("the format version")?;
        rd.event_size = match version {
            1 => EVENT_SIZE_V1,
            FORMAT_VERSION => EVENT_SIZE,
            _ => return Err(RecordError::UnsupportedVersion { version }),
        };
        let len_at = rd.offset;
        let len = rd.u32_field("the header length")?;
        if len > MAX_HEADER_LEN {
            return Err(RecordError::HeaderTooLarge {
                offset: len_at,
                len,
            });
        }
        let mut json = Vec::new();
        let got = (&mut rd.input)
            .take(u64::from(len))
            .read_to_end(&mut json)
            .map_err(|source| RecordError::Io {
                offset: HEADER_START,
                source,
            })?;
        rd.offset += got as u64;
        if got < len as usize {
            return Err(rd.truncated(HEADER_START, "the JSON header", len as usize, got));
        }
        let header: RecordHeader =
            serde_json::from_slice(&json).map_err(|source| RecordError::BadHeader {
                offset: HEADER_START,
                source,
            })?;
        if header.event_size as usize != rd.event_size {
            return Err(RecordError::EventSizeMismatch {
                offset: HEADER_START,
                recorded: header.event_size,
                expected: rd.event_size,
            });
        }
        if let Some(h) = header.hooks.iter().find(|h| h.id().is_none()) {
            return Err(RecordError::UnknownHook {
                offset: HEADER_START,
                name: h.hook.clone(),
            });
        }
        Ok((header, rd))
    }

    /// Byte offset of the next record.
    #[cfg(test)]
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Complete records read so far.
    #[cfg(test)]
    pub(crate) fn records_read(&self) -> u64 {
        self.records
    }

    /// Event records read so far.
    #[cfg(test)]
    pub(crate) fn events_read(&self) -> u64 {
        self.events
    }

    /// Whether the end-of-trace record has been read.
    #[cfg(test)]
    pub(crate) fn finished(&self) -> bool {
        self.ended
    }

    fn truncated(
        &self,
        offset: u64,
        what: &'static str,
        expected: usize,
        found: usize,
    ) -> RecordError {
        RecordError::Truncated {
            offset,
            what,
            expected,
            found,
            records: self.records,
        }
    }

    fn u32_field(&mut self, what: &'static str) -> Result<u32, RecordError> {
        let at = self.offset;
        let mut b = [0u8; 4];
        let n = self.fill(&mut b)?;
        if n < b.len() {
            return Err(self.truncated(at, what, b.len(), n));
        }
        Ok(u32::from_le_bytes(b))
    }

    /// Reads up to `buf.len()` bytes, fewer only at end of file; advances the offset.
    #[inline]
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, RecordError> {
        let avail = self.input.buffer();
        if let Some(src) = avail.get(..buf.len()) {
            buf.copy_from_slice(src);
            self.input.consume(buf.len());
            self.offset += buf.len() as u64;
            return Ok(buf.len());
        }
        let mut n = 0;
        while n < buf.len() {
            match self.input.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n = (n + k).min(buf.len()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(RecordError::Io {
                        offset: self.offset + n as u64,
                        source,
                    });
                }
            }
        }
        self.offset += n as u64;
        Ok(n)
    }

    fn payload<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], RecordError> {
        let at = self.offset;
        let mut buf = [0u8; N];
        let n = self.fill(&mut buf)?;
        if n < N {
            return Err(self.truncated(at, what, N, n));
        }
        Ok(buf)
    }

    fn read_record(&mut self) -> Result<Record, RecordError> {
        let start = self.offset;
        let mut head = [0u8; RECORD_HEAD];
        let n = self.fill(&mut head)?;
        if n == 0 {
            return Err(RecordError::Unfinished {
                offset: start,
                records: self.records,
                events: self.events,
            });
        }
        if n < RECORD_HEAD {
            return Err(self.truncated(start, "a record header (tag and length)", RECORD_HEAD, n));
        }
        let [tag, l0, l1] = head;
        let len = u16::from_le_bytes([l0, l1]);
        let expected = match tag {
            TAG_EVENT => self.event_size,
            TAG_LOST | TAG_END => PAIR_LEN,
            _ => return Err(RecordError::UnknownTag { offset: start, tag }),
        };
        if len as usize != expected {
            return Err(RecordError::BadLength {
                offset: start,
                tag,
                len,
                expected,
            });
        }
        let record = match tag {
            TAG_EVENT => {
                // An older format's shorter event: the fields added since stay zero.
                let mut raw = [0u8; EVENT_SIZE];
                let (at, n) = (self.offset, self.event_size);
                let got = self.fill(&mut raw[..n])?;
                if got < n {
                    return Err(self.truncated(at, "an event record", n, got));
                }
                let ev = parse_raw(&raw).map_err(|e| RecordError::BadEvent {
                    offset: start,
                    reason: e.to_string(),
                })?;
                self.events += 1;
                Record::Event(ev)
            }
            TAG_LOST => {
                let (ts_ns, total) = unpair(&self.payload::<PAIR_LEN>("a lost-events record")?);
                self.lost = total;
                Record::Lost { ts_ns, total }
            }
            _ => {
                let (events, lost) = unpair(&self.payload::<PAIR_LEN>("the end-of-trace record")?);
                self.check_trailer(start, events, lost)?;
                self.ended = true;
                Record::End { events, lost }
            }
        };
        self.records += 1;
        Ok(record)
    }

    fn check_trailer(&mut self, start: u64, events: u64, lost: u64) -> Result<(), RecordError> {
        let mismatch = |what, trailer, counted| RecordError::TrailerMismatch {
            offset: start,
            what,
            trailer,
            counted,
        };
        if events != self.events {
            return Err(mismatch("events", events, self.events));
        }
        if lost != self.lost {
            return Err(mismatch("lost events", lost, self.lost));
        }
        let at = self.offset;
        let mut byte = [0u8; 1];
        if self.fill(&mut byte)? != 0 {
            return Err(RecordError::DataAfterEnd {
                offset: at,
                byte: byte[0],
            });
        }
        Ok(())
    }
}

impl<R: Read> Iterator for RecordReader<R> {
    type Item = Result<Record, RecordError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.read_record();
        if matches!(r, Err(_) | Ok(Record::End { .. })) {
            self.done = true;
        }
        Some(r)
    }
}

impl<R: Read> std::iter::FusedIterator for RecordReader<R> {}

/// Reads a whole in-memory recording, strictly: a cut-short recording is an error too (use
/// [`RecordReader`] to keep the records before the cut).
pub fn read_all(bytes: &[u8]) -> Result<(RecordHeader, Vec<Record>), RecordError> {
    let (header, reader) = RecordReader::open(bytes)?;
    let records = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((header, records))
}
