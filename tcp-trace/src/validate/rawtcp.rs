//! Hand-made TCP segments for the TIME_WAIT scenarios (a RST, an ACK or a retransmitted FIN
//! aimed at a minisocket), and a way to see what the kernel answers on the wire. A raw IPPROTO_TCP
//! socket: the kernel writes the IP header, we write the TCP header; it also receives a copy of
//! every TCP segment arriving in its namespace.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use tcp_trace_common::tcp_flag;

/// A TCP segment as seen on the wire, the fields the scenarios look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) src: SocketAddrV4,
    pub(crate) dst: SocketAddrV4,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) flags: u8,
    pub(crate) len: usize,
}

impl Seen {
    pub(crate) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

pub(crate) struct RawTcp {
    fd: OwnedFd,
}

fn checksum(words: &[u8], mut sum: u32) -> u16 {
    let mut chunks = words.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IPv4 pseudo-header's part of the TCP checksum (RFC 793).
fn pseudo_header_sum(src: SocketAddrV4, dst: SocketAddrV4, tcp_len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    pseudo
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum()
}

/// A TCP header (no options) plus payload, with the checksum over the IPv4 pseudo-header.
pub(crate) fn build_segment(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.push(5 << 4); // data offset: 20 bytes
    seg.push(flags);
    seg.extend_from_slice(&65535u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    seg.extend_from_slice(payload);
    let sum = checksum(&seg, pseudo_header_sum(src, dst, seg.len()));
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

/// Parses an IPv4 packet carrying TCP (as a raw socket delivers it).
pub(crate) fn parse_ipv4_tcp(pkt: &[u8]) -> Option<Seen> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != 6 {
        return None;
    }
    let ihl = (pkt[0] & 0x0f) as usize * 4;
    let total = (u16::from_be_bytes([pkt[2], pkt[3]]) as usize).min(pkt.len());
    let tcp = pkt.get(ihl..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let doff = (tcp[12] >> 4) as usize * 4;
    let ip = |o: usize| Ipv4Addr::new(pkt[o], pkt[o + 1], pkt[o + 2], pkt[o + 3]);
    let port = |o: usize| u16::from_be_bytes([tcp[o], tcp[o + 1]]);
    let word = |o: usize| u32::from_be_bytes([tcp[o], tcp[o + 1], tcp[o + 2], tcp[o + 3]]);
    Some(Seen {
        src: SocketAddrV4::new(ip(12), port(0)),
        dst: SocketAddrV4::new(ip(16), port(2)),
        seq: word(4),
        ack: word(8),
        flags: tcp[13],
        len: tcp.len().saturating_sub(doff),
    })
}

impl RawTcp {
    /// Opens the raw socket in the calling thread's namespace (needs CAP_NET_RAW).
    pub(crate) fn open() -> Result<RawTcp> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        if fd < 0 {
            bail!("raw TCP socket: {}", std::io::Error::last_os_error());
        }
        Ok(RawTcp {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Like [`RawTcp::open`], with a receive buffer of `bytes` (SO_RCVBUFFORCE, as root): room
    /// for a bulk transfer's copies while a reader drains them.
    pub(crate) fn open_with_buffer(bytes: i32) -> Result<RawTcp> {
        let raw = RawTcp::open()?;
        // SAFETY: a valid int option on our own fd.
        let rc = unsafe {
            libc::setsockopt(
                raw.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as u32,
            )
        };
        if rc != 0 {
            bail!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
        }
        Ok(raw)
    }

    pub(crate) fn send(
        &self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        seq: u32,
        ack: u32,
        flags: u8,
    ) -> Result<()> {
        self.send_data(src, dst, seq, ack, flags, &[])
    }

    /// A segment with a payload.
    pub(crate) fn send_data(
        &self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) -> Result<()> {
        let seg = build_segment(src, dst, seq, ack, flags, payload);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: buffer and address are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                seg.as_ptr().cast(),
                seg.len(),
                0,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Segments arriving from `from` within `wait`.
    pub(crate) fn collect_from(&self, from: SocketAddrV4, wait: Duration) -> Vec<Seen> {
        self.collect_until(from, wait, |_| false)
    }

    /// Segments arriving from `from` within `wait`, up to and including the first one `last`
    /// accepts.
    pub(crate) fn collect_until(
        &self,
        from: SocketAddrV4,
        wait: Duration,
        last: impl Fn(&Seen) -> bool,
    ) -> Vec<Seen> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().max(1) as i32;
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                break;
            }
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                continue;
            }
            if let Some(seen) = parse_ipv4_tcp(&buf[..n as usize])
                && seen.src == from
            {
                out.push(seen);
                if last(&seen) {
                    break;
                }
            }
        }
        out
    }
}

/// Names of the flags set, tcpdump style.
pub(crate) fn flag_names(flags: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (tcp_flag::SYN, 'S'),
        (tcp_flag::FIN, 'F'),
        (tcp_flag::RST, 'R'),
        (tcp_flag::PSH, 'P'),
        (tcp_flag::ACK, '.'),
    ] {
        if flags & bit != 0 {
            s.push(c);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_checksum_verifies_and_parses_back() {
        let src: SocketAddrV4 = "10.1.0.1:40000".parse().unwrap();
        let dst: SocketAddrV4 = "10.1.0.2:80".parse().unwrap();
        let seg = build_segment(src, dst, 1000, 2000, tcp_flag::RST | tcp_flag::ACK, b"x");
        // Re-summing a segment with its checksum in place gives zero.
        assert_eq!(checksum(&seg, pseudo_header_sum(src, dst, seg.len())), 0);

        let mut pkt = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0];
        pkt.extend_from_slice(&src.ip().octets());
        pkt.extend_from_slice(&dst.ip().octets());
        pkt.extend_from_slice(&seg);
        let total = pkt.len() as u16;
        pkt[2..4].copy_from_slice(&total.to_be_bytes());
        let seen = parse_ipv4_tcp(&pkt).unwrap();
        assert_eq!(
            (seen.src, seen.dst, seen.seq, seen.ack),
            (src, dst, 1000, 2000)
        );
        assert_eq!(seen.len, 1);
        assert_eq!(flag_names(seen.flags), "R.");
        assert!(parse_ipv4_tcp(&pkt[..10]).is_none());
    }
}
