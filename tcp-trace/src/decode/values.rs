//! Small, `Copy` values for the fields of a decoded event. An event is decoded for every record
//! the kernel sends (hundreds of thousands a second on a busy host), then queued, kept in its
//! flow and judged: these types keep that free of heap allocation. Each prints (and serializes
//! to JSON) as the text users see, and derefs to it where code compares names.

use std::{fmt, ops::Deref};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

use tcp_trace_common::COMM_LEN;

use crate::model::TcpState;

/// A task's command name (`comm`, at most 15 bytes), stored inline. Bytes that are not UTF-8
/// are shown as `?`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Comm {
    len: u8,
    bytes: [u8; COMM_LEN],
}

impl Comm {
    /// From the kernel's NUL-padded `comm` array.
    pub(crate) fn from_kernel(raw: &[u8]) -> Comm {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let mut c = Comm::default();
        let n = end.min(COMM_LEN);
        c.bytes[..n].copy_from_slice(&raw[..n]);
        if std::str::from_utf8(&c.bytes[..n]).is_err() {
            for b in &mut c.bytes[..n] {
                if !b.is_ascii() {
                    *b = b'?';
                }
            }
        }
        c.len = n as u8;
        c
    }

    pub(crate) fn as_str(&self) -> &str {
        // Always valid: from_kernel and From<&str> only store UTF-8.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

impl From<&str> for Comm {
    /// Truncated to [`COMM_LEN`] bytes at a character boundary, as tests and inferred owners
    /// need.
    fn from(s: &str) -> Comm {
        let mut end = s.len().min(COMM_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Comm::from_kernel(&s.as_bytes()[..end])
    }
}

impl Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Comm {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Comm {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Comm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Comm::from(String::deserialize(d)?.as_str()))
    }
}

/// A kernel socket address (`struct sock *`, or the TIME_WAIT minisocket's): shown in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub(crate) struct SockPtr(pub u64);

impl SockPtr {
    pub(crate) fn is_null(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for SockPtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for SockPtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for SockPtr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SockPtr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let hex = s.strip_prefix("0x").unwrap_or(&s);
        u64::from_str_radix(hex, 16)
            .map(SockPtr)
            .map_err(|_| D::Error::custom(format!("not a socket address: {s:?}")))
    }
}

/// A kernel TCP state number (include/net/tcp_states.h), or a TIME_WAIT substate (which uses
/// the same numbers), shown by name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct KState(pub u8);

/// Kernel TCP state names, by number.
const STATE_NAMES: [&str; 13] = [
    "UNKNOWN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

impl KState {
    /// The TCP state, when the number is one (0 and 13, TCP_BOUND_INACTIVE, are not).
    pub(crate) fn tcp(self) -> Option<TcpState> {
        TcpState::from_kernel(self.0)
    }

    pub(crate) fn name(self) -> &'static str {
        STATE_NAMES
            .get(self.0 as usize)
            .copied()
            .unwrap_or("UNKNOWN")
    }

    /// The number of a state name (the inverse of [`KState::name`]), for tests and fixtures.
    pub(crate) fn from_name(name: &str) -> Option<KState> {
        STATE_NAMES
            .iter()
            .position(|n| *n == name)
            .filter(|&i| i > 0)
            .map(|i| KState(i as u8))
    }
}

impl fmt::Display for KState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Debug for KState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for KState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for KState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KState::from_name(&s).ok_or_else(|| D::Error::custom(format!("not a TCP state: {s:?}")))
    }
}

/// The flags byte of a TCP header, shown tcpdump-style (`S`, `F`, `R`, `P`, `.`, `U`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct TcpFlags(pub u8);

const FLAG_LETTERS: [(u8, char); 6] = [
    (0x02, 'S'),
    (0x01, 'F'),
    (0x04, 'R'),
    (0x08, 'P'),
    (0x10, '.'),
    (0x20, 'U'),
];

impl TcpFlags {
    /// Whether the flag shown as `letter` is set.
    pub(crate) fn contains(self, letter: char) -> bool {
        FLAG_LETTERS
            .iter()
            .any(|&(bit, c)| c == letter && self.0 & bit != 0)
    }

    /// None of the shown flags is set.
    pub(crate) fn is_empty(self) -> bool {
        FLAG_LETTERS.iter().all(|&(bit, _)| self.0 & bit == 0)
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (bit, c) in FLAG_LETTERS {
            if self.0 & bit != 0 {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl Serialize for TcpFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The address family, as `--json` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Family {
    Ipv4,
    Ipv6,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events are queued, kept in flows and in reset histories by the hundred thousand: a new
    /// field that makes them much bigger should be a decision, not an accident.
    #[test]
    fn decoded_events_stay_small() {
        assert!(std::mem::size_of::<crate::decode::TraceEvent>() <= 288);
    }

    #[test]
    fn comm_keeps_utf8_and_replaces_the_rest() {
        assert_eq!(Comm::from_kernel(b"curl\0\0\0"), "curl");
        assert_eq!(Comm::from_kernel(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(Comm::from_kernel(b"a\xffb\0"), "a?b");
        assert_eq!(Comm::from("h\u{e9}llo"), "h\u{e9}llo");
        assert_eq!(Comm::from("a-very-long-command-name").len(), COMM_LEN);
        assert_eq!(serde_json::to_string(&Comm::from("x")).unwrap(), "\"x\"");
    }

    #[test]
    fn states_flags_and_pointers_print_as_users_read_them() {
        assert_eq!(KState(4).to_string(), "FIN_WAIT1");
        assert_eq!(KState(99).name(), "UNKNOWN");
        assert_eq!(KState(99).tcp(), None);
        assert_eq!(KState(8).tcp(), Some(TcpState::CloseWait));
        assert_eq!(KState::from_name("LAST_ACK"), Some(KState(9)));
        assert_eq!(KState::from_name("UNKNOWN"), None);
        assert_eq!(TcpFlags(0x11).to_string(), "F.");
        assert!(TcpFlags(0x14).contains('R') && !TcpFlags(0x14).contains('S'));
        assert!(TcpFlags(0x40).is_empty());
        assert_eq!(
            SockPtr(0xffff_8880_0000_1000).to_string(),
            "0xffff888000001000"
        );
        assert_eq!(
            serde_json::to_string(&SockPtr(0x10)).unwrap(),
            "\"0x10\"".to_string()
        );
    }
}

/// Conversions from the text form, for building events in tests.
#[cfg(test)]
mod from_text {
    use super::*;

    impl From<&str> for KState {
        fn from(name: &str) -> KState {
            KState::from_name(name).unwrap_or_else(|| panic!("not a TCP state: {name}"))
        }
    }

    impl From<&str> for SockPtr {
        fn from(s: &str) -> SockPtr {
            SockPtr(u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex pointer"))
        }
    }

    impl PartialEq<&str> for SockPtr {
        fn eq(&self, other: &&str) -> bool {
            *self == SockPtr::from(*other)
        }
    }

    impl From<&str> for TcpFlags {
        fn from(letters: &str) -> TcpFlags {
            TcpFlags(
                FLAG_LETTERS
                    .iter()
                    .filter(|(_, c)| letters.contains(*c))
                    .fold(0, |acc, (bit, _)| acc | bit),
            )
        }
    }

    impl PartialEq<&str> for TcpFlags {
        fn eq(&self, other: &&str) -> bool {
            *self == TcpFlags::from(*other)
        }
    }

    impl From<&str> for Family {
        fn from(s: &str) -> Family {
            match s {
                "ipv4" => Family::Ipv4,
                "ipv6" => Family::Ipv6,
                _ => panic!("not a family: {s}"),
            }
        }
    }
}
