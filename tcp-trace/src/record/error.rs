//! [`RecordError`]: everything that can be wrong with a recording, each naming the byte offset
//! where the reader found it and what it expected there.

use std::{error::Error, fmt, io};

use serde_json::error::Category;

#[cfg(test)]
use super::MAGIC;
use super::{FORMAT_VERSION, MAX_HEADER_LEN, TAG_END, TAG_EVENT, TAG_LOST};

/// Why a recording cannot be read (further). Every variant but [`RecordError::NotARecording`]
/// names the byte offset of the problem ([`RecordError::offset`]).
///
/// [`RecordError::is_cut_short`] tells a recording that is fine up to where it stops (killed
/// `tcp-trace record`, full disk, partial copy) from a corrupt or foreign one: the records a
/// [`super::RecordReader`] yielded before a cut-short error are complete and usable.
#[derive(Debug)]
#[non_exhaustive]
pub enum RecordError {
    /// Reading the underlying file failed.
    Io { offset: u64, source: io::Error },
    /// The file is empty.
    Empty,
    /// The first bytes are not [`MAGIC`] (`found` holds up to its first 8 bytes).
    NotARecording { found: Vec<u8> },
    /// The format version is newer than [`FORMAT_VERSION`], or 0.
    UnsupportedVersion { version: u32 },
    /// The header length field exceeds [`MAX_HEADER_LEN`].
    HeaderTooLarge { offset: u64, len: u32 },
    /// The JSON header is not JSON, or not a [`super::RecordHeader`].
    BadHeader {
        offset: u64,
        source: serde_json::Error,
    },
    /// The header's `event_size` is not this build's [`tcp_trace_common::EVENT_SIZE`].
    EventSizeMismatch {
        offset: u64,
        recorded: u32,
        expected: usize,
    },
    /// The header lists a hook this build's registry does not have.
    UnknownHook { offset: u64, name: String },
    /// The file ends inside `what`, which starts at `offset` and needs `expected` bytes.
    /// `records` complete records came before it.
    Truncated {
        offset: u64,
        what: &'static str,
        expected: usize,
        found: usize,
        records: u64,
    },
    /// The file ends cleanly between records at `offset` but without the end-of-trace record:
    /// the recording was not finished. `records` (`events` of them events) were complete.
    Unfinished {
        offset: u64,
        records: u64,
        events: u64,
    },
    /// The record at `offset` has a tag that is not `E`, `L` or `Z`.
    UnknownTag { offset: u64, tag: u8 },
    /// The record at `offset` has a known tag but the wrong payload length.
    BadLength {
        offset: u64,
        tag: u8,
        len: u16,
        expected: usize,
    },
    /// The event record at `offset` does not fit the ABI (`decode::parse_raw` rejected it).
    BadEvent { offset: u64, reason: String },
    /// The end-of-trace record at `offset` disagrees with what the file holds.
    TrailerMismatch {
        offset: u64,
        what: &'static str,
        trailer: u64,
        counted: u64,
    },
    /// There is data after the end-of-trace record, starting at `offset` with byte `byte`.
    DataAfterEnd { offset: u64, byte: u8 },
}

impl RecordError {
    /// The byte offset (from the start of the file) that the error is about.
    #[cfg(test)]
    pub(crate) fn offset(&self) -> Option<u64> {
        match self {
            RecordError::Io { offset, .. }
            | RecordError::HeaderTooLarge { offset, .. }
            | RecordError::BadHeader { offset, .. }
            | RecordError::EventSizeMismatch { offset, .. }
            | RecordError::UnknownHook { offset, .. }
            | RecordError::Truncated { offset, .. }
            | RecordError::Unfinished { offset, .. }
            | RecordError::UnknownTag { offset, .. }
            | RecordError::BadLength { offset, .. }
            | RecordError::BadEvent { offset, .. }
            | RecordError::TrailerMismatch { offset, .. }
            | RecordError::DataAfterEnd { offset, .. } => Some(*offset),
            RecordError::Empty => Some(0),
            RecordError::UnsupportedVersion { .. } => Some(MAGIC.len() as u64),
            RecordError::NotARecording { .. } => Some(0),
        }
    }

    /// True when the file is a valid recording up to where it stops: it was cut short (or never
    /// finished) rather than corrupt. The records read before the error are complete.
    pub(crate) fn is_cut_short(&self) -> bool {
        matches!(
            self,
            RecordError::Truncated { .. } | RecordError::Unfinished { .. }
        )
    }

    /// For a cut-short recording, how many complete records came before the cut.
    #[cfg(test)]
    pub(crate) fn complete_records(&self) -> Option<u64> {
        match self {
            RecordError::Truncated { records, .. } | RecordError::Unfinished { records, .. } => {
                Some(*records)
            }
            _ => None,
        }
    }
}

fn tag_name(tag: u8) -> &'static str {
    match tag {
        TAG_EVENT => "event record (tag E)",
        TAG_LOST => "lost-events record (tag L)",
        TAG_END => "end-of-trace record (tag Z)",
        _ => "record",
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Io { offset, source } => {
                write!(f, "byte {offset}: reading the recording failed: {source}")
            }
            RecordError::Empty => write!(
                f,
                "byte 0: the file is empty, not a tcp-trace recording (those start with TCPTRACE)"
            ),
            RecordError::NotARecording { found } => write!(
                f,
                "not a tcp-trace recording: the file starts with \"{}\" instead of TCPTRACE",
                found.escape_ascii()
            ),
            RecordError::UnsupportedVersion { version } if *version > FORMAT_VERSION => write!(
                f,
                "recording format version {version} is newer than this tcp-trace understands \
                 ({FORMAT_VERSION}): upgrade tcp-trace"
            ),
            RecordError::UnsupportedVersion { version } => write!(
                f,
                "byte 8: recording format version {version} does not exist (this tcp-trace \
                 understands {FORMAT_VERSION}): the file is corrupt"
            ),
            RecordError::HeaderTooLarge { offset, len } => write!(
                f,
                "byte {offset}: header length {len} exceeds the {MAX_HEADER_LEN}-byte limit \
                 (file corrupt or not a tcp-trace recording)"
            ),
            RecordError::BadHeader { offset, source } => match source.classify() {
                Category::Data => write!(
                    f,
                    "byte {offset}: header does not describe a tcp-trace recording: {source}"
                ),
                _ => write!(f, "byte {offset}: header is not valid JSON: {source}"),
            },
            RecordError::EventSizeMismatch {
                offset,
                recorded,
                expected,
            } => write!(
                f,
                "byte {offset}: the recording's events are {recorded} bytes but this tcp-trace's \
                 are {expected}: it was recorded by an incompatible tcp-trace version"
            ),
            RecordError::UnknownHook { offset, name } => write!(
                f,
                "byte {offset}: the header lists hook `{name}`, which this tcp-trace does not \
                 know: replay it with the tcp-trace that recorded it (or a newer one)"
            ),
            RecordError::Truncated {
                offset,
                what,
                expected,
                found,
                records,
            } => write!(
                f,
                "byte {offset}: file ends inside {what} (expected {expected} bytes, found \
                 {found}): the recording was cut short after {records} complete records"
            ),
            RecordError::Unfinished {
                offset,
                records,
                events,
            } => write!(
                f,
                "byte {offset}: the recording was not finished: the file ends after {records} \
                 complete records ({events} events) without the end-of-trace record (tcp-trace \
                 record was killed, or the file was cut short)"
            ),
            RecordError::UnknownTag { offset, tag } => write!(
                f,
                "byte {offset}: record tag {tag:#04x} is not E, L or Z (file corrupt or not a \
                 tcp-trace recording)"
            ),
            RecordError::BadLength {
                offset,
                tag,
                len,
                expected,
            } => write!(
                f,
                "byte {offset}: {} has length {len}, expected {expected} (file corrupt)",
                tag_name(*tag)
            ),
            RecordError::BadEvent { offset, reason } => write!(
                f,
                "byte {offset}: {reason} (file corrupt, or recorded by a newer tcp-trace)"
            ),
            RecordError::TrailerMismatch {
                offset,
                what,
                trailer,
                counted,
            } => write!(
                f,
                "byte {offset}: the end-of-trace record counts {trailer} {what} but the file \
                 holds {counted} (file corrupt)"
            ),
            RecordError::DataAfterEnd { offset, byte } => write!(
                f,
                "byte {offset}: data after the end-of-trace record (starting with {byte:#04x}): \
                 file corrupt, or two recordings concatenated"
            ),
        }
    }
}

impl Error for RecordError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RecordError::Io { source, .. } => Some(source),
            RecordError::BadHeader { source, .. } => Some(source),
            _ => None,
        }
    }
}
