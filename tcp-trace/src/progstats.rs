//! What the kernel counts about our programs and ring buffer that aya does not expose: each
//! program's recursion misses (`bpf_prog_info.recursion_misses`, 5.12+: a run skipped because
//! another BPF program was running on that CPU) and the ring buffer's fill (its producer and
//! consumer positions, mapped read-only). Both feed `--metrics`.

use std::os::fd::{AsFd, AsRawFd};

/// `bpf_prog_info` up to `recursion_misses` (include/uapi/linux/bpf.h, an append-only struct:
/// the kernel fills what it has and zeroes the rest).
const PROG_INFO_LEN: usize = 216;
const RECURSION_MISSES_OFFSET: usize = 208;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A program's recursion misses, or `None` when the kernel does not tell (before 5.12 the
/// returned info is shorter than the field).
pub(crate) fn recursion_misses(prog: &impl AsFd) -> Option<u64> {
    let mut info = [0u8; PROG_INFO_LEN];
    let mut attr = InfoAttr {
        bpf_fd: prog.as_fd().as_raw_fd() as u32,
        info_len: PROG_INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr points at a buffer of info_len bytes that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>() as u32,
        )
    };
    if rc != 0 || (attr.info_len as usize) < RECURSION_MISSES_OFFSET + 8 {
        return None;
    }
    let bytes: [u8; 8] = info[RECURSION_MISSES_OFFSET..RECURSION_MISSES_OFFSET + 8]
        .try_into()
        .ok()?;
    Some(u64::from_ne_bytes(bytes))
}

/// The sum of the recursion misses of every loaded program.
pub(crate) fn total_recursion_misses(ebpf: &aya::Ebpf) -> u64 {
    ebpf.programs()
        .filter_map(|(_, p)| p.fd().ok())
        .filter_map(recursion_misses)
        .sum()
}

/// The ring buffer's consumer and producer pages, mapped read-only (the kernel allows that on
/// any part of the mapping; only the consumer page may be mapped writable).
pub(crate) struct RingFill {
    base: *mut libc::c_void,
    page: usize,
    size: u64,
}

impl RingFill {
    /// Maps the positions of the ring buffer `ring` of `size` bytes; `None` if the kernel
    /// refuses.
    pub(crate) fn new(ring: &impl AsFd, size: u32) -> Option<Self> {
        let page = crate::attach::page_size() as usize;
        // SAFETY: a fresh read-only shared mapping of the map's first two pages; the kernel
        // checks the range.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                ring.as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        Some(Self {
            base,
            page,
            size: size as u64,
        })
    }

    /// Bytes written by the programs and not yet consumed, over the ring's size.
    pub(crate) fn ratio(&self) -> f64 {
        // SAFETY: both positions are u64s at the start of their pages, inside the mapping; the
        // kernel updates them concurrently, so they are read volatile.
        let (consumer, producer) = unsafe {
            (
                std::ptr::read_volatile(self.base as *const u64),
                std::ptr::read_volatile(self.base.cast::<u8>().add(self.page) as *const u64),
            )
        };
        (producer.saturating_sub(consumer) as f64 / self.size as f64).clamp(0.0, 1.0)
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base, 2 * self.page) };
    }
}
