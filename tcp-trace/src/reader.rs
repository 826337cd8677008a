//! The ring-buffer reader of the live trace, on a thread of its own: it only copies records out
//! of the ring, in batches (everything available per wake-up), and hands them to the pipeline
//! thread, which decodes, symbolizes, judges and prints. A slow moment of the pipeline (a burst
//! of flow reports, symbolizing a new binary for `--stacks`, a slow output) then no longer
//! leaves the ring undrained.
//!
//! Backpressure: the hand-off channel is bounded and the reader *blocks* when it is full, so the
//! ring fills behind it and the kernel counts what does not fit (`DROPPED`, per CPU). Dropping
//! batches in userspace instead would add a loss that the programs' counters do not see and
//! that the readings below could not place in time; blocking keeps a single, exact loss count,
//! and the channel adds [`CHANNEL_BATCHES`] x [`BATCH_BYTES`] of buffering to the ring's.
//!
//! The lost counters are read here, between drains, and sent in order with the records: every
//! record drained before a reading is ahead of it in the channel, so the pipeline learns of a
//! loss before it releases the flows that were alive during it, as when it drained the ring
//! itself.

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::ProgramFd,
};
use tokio::sync::mpsc;

/// How often the lost counters are read and the pipeline ticks (flows aged, output flushed).
/// The programs wake the reader only when a lot is pending; this also drains the rest.
pub(crate) const TICK: Duration = Duration::from_millis(50);
/// The programs' recursion misses cost a syscall per program: read at most this often (and at
/// the end). The ring-full counter, one syscall, is read on every tick.
pub(crate) const RECURSION_EVERY: Duration = Duration::from_secs(1);
/// A batch is sent once it holds this many bytes of records (about 1,300 events).
pub(crate) const BATCH_BYTES: usize = 256 << 10;
/// Batches in flight between the reader and the pipeline: 8 MiB at most, twice the default ring.
pub(crate) const CHANNEL_BATCHES: usize = 32;

/// Records copied out of the ring, back to back.
#[derive(Default)]
pub(crate) struct Batch {
    data: Vec<u8>,
    ends: Vec<u32>,
}

impl Batch {
    pub(crate) fn push(&mut self, record: &[u8]) {
        self.data.extend_from_slice(record);
        self.ends.push(self.data.len() as u32);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Whether it is time to send it.
    pub(crate) fn full(&self) -> bool {
        self.data.len() >= BATCH_BYTES
    }

    /// The records, in ring order.
    pub(crate) fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let r = &self.data[start..end as usize];
            start = end as usize;
            r
        })
    }
}

/// Events lost so far, by cause: the ring buffer was full, or a program did not run because
/// another was running on its CPU (the kernel's recursion misses, 5.12+).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Lost {
    pub(crate) ring_full: u64,
    pub(crate) recursion: u64,
}

impl Lost {
    pub(crate) fn total(self) -> u64 {
        self.ring_full + self.recursion
    }
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} lost", self.total())?;
        if self.total() > 0 {
            write!(
                f,
                " ({} ring buffer full, {} skipped as programs nested)",
                self.ring_full, self.recursion
            )?;
        }
        Ok(())
    }
}

/// What the reader sends, in ring order.
pub(crate) enum Msg {
    Batch(Batch),
    /// The lost counters as read at `ts_ns` (CLOCK_MONOTONIC), after every record ahead of it.
    Tick {
        ts_ns: u64,
        lost: Lost,
    },
    /// Everything the ring held when [`Cmd::Flush`] arrived is ahead of this.
    Flushed,
}

/// What the pipeline thread asks of the reader.
pub(crate) enum Cmd {
    /// Drain the ring now and say so ([`Msg::Flushed`]).
    Flush,
    /// Drain the ring, read every counter, send a last [`Msg::Tick`] and end.
    Stop,
}

/// The reader's ends: its commands in, its messages out.
pub(crate) struct Handle {
    pub(crate) cmds: std_mpsc::Sender<Cmd>,
    pub(crate) msgs: mpsc::Receiver<Msg>,
    pub(crate) thread: std::thread::JoinHandle<Result<()>>,
}

/// Starts the reader on `ring`, reading losses from `dropped` and the recursion misses of
/// `programs` (the attached ones: a program whose attach failed is unloaded).
pub(crate) fn spawn(
    ring: RingBuf<MapData>,
    dropped: PerCpuArray<MapData, u64>,
    programs: Vec<ProgramFd>,
) -> Result<Handle> {
    let (cmd_tx, cmd_rx) = std_mpsc::channel();
    let (msg_tx, msg_rx) = mpsc::channel(CHANNEL_BATCHES);
    let epoll = wake_ups(&ring)?;
    let reader = Reader {
        epoll,
        ring,
        dropped,
        programs,
        out: msg_tx,
        cmds: cmd_rx,
        recursion: 0,
    };
    let thread = std::thread::Builder::new()
        .name("ring-reader".into())
        .spawn(move || reader.run())?;
    Ok(Handle {
        cmds: cmd_tx,
        msgs: msg_rx,
        thread,
    })
}

/// An edge-triggered epoll on the ring: it reports the programs' wake-ups (when pending data
/// crosses their threshold), not every record. A level-triggered poll would return as soon as
/// one record is pending and turn the reader into a busy loop of one-record batches.
fn wake_ups(ring: &RingBuf<MapData>) -> Result<OwnedFd> {
    // SAFETY: epoll_create1 has no memory preconditions; a valid fd is owned from here on.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        anyhow::bail!("epoll_create1: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: both descriptors are open; ev is valid for the call.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            ring.as_fd().as_raw_fd(),
            &mut ev,
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "polling the ring buffer: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(epoll)
}

struct Reader {
    epoll: OwnedFd,
    ring: RingBuf<MapData>,
    dropped: PerCpuArray<MapData, u64>,
    programs: Vec<ProgramFd>,
    out: mpsc::Sender<Msg>,
    cmds: std_mpsc::Receiver<Cmd>,
    /// The recursion misses as last read.
    recursion: u64,
}

/// The pipeline thread has gone (it failed): nothing more to do.
struct Gone;

impl Reader {
    fn run(mut self) -> Result<()> {
        let mut next_tick = Instant::now() + TICK;
        let mut recursion_due = Instant::now() + RECURSION_EVERY;
        loop {
            self.wait(next_tick.saturating_duration_since(Instant::now()))?;
            if self.drain().is_err() {
                return Ok(());
            }
            let sent = match self.cmds.try_recv() {
                Ok(Cmd::Flush) => self.drain().and_then(|()| self.send(Msg::Flushed)),
                Ok(Cmd::Stop) | Err(std_mpsc::TryRecvError::Disconnected) => {
                    let _ = self.drain().and_then(|()| self.tick(true));
                    return Ok(());
                }
                Err(std_mpsc::TryRecvError::Empty) => Ok(()),
            };
            if sent.is_err() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= next_tick {
                let recursion = now >= recursion_due;
                if recursion {
                    recursion_due = now + RECURSION_EVERY;
                }
                if self.tick(recursion).is_err() {
                    return Ok(());
                }
                next_tick = now + TICK;
            }
        }
    }

    /// Until the programs wake the ring (a lot is pending) or `timeout`.
    fn wait(&self, timeout: Duration) -> Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        let ms = timeout.as_millis().clamp(1, TICK.as_millis()) as libc::c_int;
        // SAFETY: room for one event, for the duration of the call.
        let rc = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut ev, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                anyhow::bail!("polling the ring buffer: {e}");
            }
        }
        Ok(())
    }

    /// Everything the ring holds now, in batches.
    fn drain(&mut self) -> Result<(), Gone> {
        let mut batch = Batch::default();
        let out = &self.out;
        while let Some(item) = self.ring.next() {
            batch.push(&item);
            drop(item);
            if batch.full() {
                send(out, Msg::Batch(std::mem::take(&mut batch)))?;
            }
        }
        if !batch.is_empty() {
            self.send(Msg::Batch(batch))?;
        }
        Ok(())
    }

    /// Reads the lost counters (the recursion misses too when `recursion`) and sends them.
    fn tick(&mut self, recursion: bool) -> Result<(), Gone> {
        if recursion {
            self.recursion = self
                .programs
                .iter()
                .filter_map(crate::progstats::recursion_misses)
                .sum();
        }
        let lost = Lost {
            ring_full: self
                .dropped
                .get(&0, 0)
                .map(|v| v.iter().sum())
                .unwrap_or_default(),
            recursion: self.recursion,
        };
        let ts_ns = crate::clock::now_ns(libc::CLOCK_MONOTONIC);
        self.send(Msg::Tick { ts_ns, lost })
    }

    fn send(&self, msg: Msg) -> Result<(), Gone> {
        send(&self.out, msg)
    }
}

/// Blocks while the channel is full (see the module's doc for why).
fn send(out: &mpsc::Sender<Msg>, msg: Msg) -> Result<(), Gone> {
    out.blocking_send(msg).map_err(|_| Gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gives_its_records_back_in_order() {
        let mut b = Batch::default();
        assert!(b.is_empty());
        assert_eq!(b.records().count(), 0);
        let recs: [&[u8]; 4] = [b"first", b"", b"third record", &[0u8; 200]];
        for r in recs {
            b.push(r);
        }
        assert_eq!(b.records().count(), 4);
        assert_eq!(b.records().collect::<Vec<_>>(), recs.to_vec());
    }

    #[test]
    fn a_batch_is_full_at_its_byte_bound() {
        let mut b = Batch::default();
        let rec = [7u8; 200];
        let mut n = 0;
        while !b.full() {
            b.push(&rec);
            n += 1;
        }
        assert_eq!(n, BATCH_BYTES.div_ceil(200));
        assert!(b.records().all(|r| r == rec));
    }

    /// The hand-off keeps order and, when the pipeline is slow, holds the reader back instead
    /// of dropping: nothing sent is lost, the channel never holds more than its bound.
    #[test]
    fn a_full_channel_blocks_the_sender_and_loses_nothing() {
        let (tx, mut rx) = mpsc::channel::<Msg>(2);
        let sender = std::thread::spawn(move || {
            for i in 0..50u32 {
                let mut b = Batch::default();
                b.push(&i.to_le_bytes());
                tx.blocking_send(Msg::Batch(b)).unwrap();
            }
            tx.blocking_send(Msg::Tick {
                ts_ns: 9,
                lost: Lost {
                    ring_full: 1,
                    recursion: 2,
                },
            })
            .unwrap();
        });
        let mut seen = Vec::new();
        let mut last = None;
        while let Some(m) = rx.blocking_recv() {
            assert!(rx.len() <= 2);
            match m {
                Msg::Batch(b) => seen.extend(
                    b.records()
                        .map(|r| u32::from_le_bytes(r.try_into().unwrap())),
                ),
                Msg::Tick { ts_ns, lost } => last = Some((ts_ns, lost)),
                Msg::Flushed => unreachable!(),
            }
        }
        sender.join().unwrap();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        let (ts, lost) = last.unwrap();
        assert_eq!((ts, lost.total()), (9, 3));
        assert_eq!(
            lost.to_string(),
            "3 lost (1 ring buffer full, 2 skipped as programs nested)"
        );
        assert_eq!(Lost::default().to_string(), "0 lost");
    }
}
