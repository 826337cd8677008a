//! User call stacks of close(): the kernel side records them (syscalls:sys_enter_close, opt-in)
//! by frame pointers into a stack-trace map; here they are read back and symbolized to function
//! and file:line with blazesym, from the process's own mappings and debug info. That has to
//! happen while the process still exists, so it is done as the event arrives: on the pipeline
//! thread, as it takes the event from the ring-buffer reader (`crate::reader`), never on the
//! reader itself, which a slow first symbolization (DWARF) would otherwise keep from draining;
//! each (process, stack, caller) is symbolized once and cached.

use std::collections::HashMap;

use aya::maps::{MapData, StackTraceMap};
use blazesym::{
    normalize::{NormalizeOpts, Normalizer, UserMeta},
    symbolize::{
        Input, Symbolized, Symbolizer,
        source::{Elf, Source},
    },
};
use serde::{Deserialize, Serialize};

/// One frame of a user call stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Frame {
    pub(crate) addr: u64,
    pub(crate) function: Option<String>,
    pub(crate) file: Option<String>,
    pub(crate) line: Option<u32>,
}

impl Frame {
    /// `function (file:line)`, as much as is known.
    pub(crate) fn describe(&self) -> String {
        let function = self
            .function
            .clone()
            .unwrap_or_else(|| format!("{:#x}", self.addr));
        match (&self.file, self.line) {
            (Some(f), Some(l)) => format!("{function} ({f}:{l})"),
            (Some(f), None) => format!("{function} ({f})"),
            _ => function,
        }
    }
}

/// Frames of libc and the Rust standard library between the program and the syscall: the
/// interesting frame is the first one that is not one of these.
pub(crate) fn is_runtime_frame(f: &Frame) -> bool {
    let Some(name) = &f.function else {
        return true;
    };
    const RUNTIME: [&str; 13] = [
        "std::rt::",
        "close",
        "__close",
        "__libc_close",
        "__GI___close",
        "__close_nocancel",
        "core::ptr::drop_in_place",
        "std::sys::",
        "std::os::fd::",
        "<std::os::fd::",
        "std::net::",
        "<std::net::",
        "core::mem::drop",
    ];
    RUNTIME.iter().any(|r| name.starts_with(r))
}

/// Puts `ret` back as the second frame unless the walk already has it there (the innermost
/// frame is the syscall's own address in libc).
pub(crate) fn with_leaf_caller(mut addrs: Vec<u64>, ret: u64) -> Vec<u64> {
    if ret != 0 && !addrs.is_empty() && addrs.get(1) != Some(&ret) {
        addrs.insert(1, ret);
    }
    addrs
}

pub(crate) struct StackResolver {
    map: StackTraceMap<MapData>,
    normalizer: Normalizer,
    symbolizer: Symbolizer,
    cache: HashMap<(u32, u32, u64), Vec<Frame>>,
}

impl StackResolver {
    pub(crate) fn new(map: StackTraceMap<MapData>) -> Self {
        Self {
            map,
            // Keep each process's memory map once read: a process that exits right after its
            // close() (while an earlier stack is still being symbolized) still gets names.
            normalizer: Normalizer::builder().enable_vma_caching(true).build(),
            symbolizer: Symbolizer::new(),
            cache: HashMap::new(),
        }
    }

    /// The stack `id` (as the event carries it: 1 + map id) of a thread of process `pid`, with
    /// `ret` (the word on top of the user stack at close() entry) put back where the
    /// frame-pointer walk skipped it: libc's close() keeps no frame, so its caller's frame
    /// pointer leads straight to the caller's caller.
    ///
    /// Addresses are first normalized to (file, offset) through /proc/<pid>/maps, which is
    /// quick, and then symbolized from the files themselves, which can take a while the first
    /// time (DWARF) but no longer needs the process: short-lived programs still get names.
    pub(crate) fn resolve(&mut self, pid: u32, id: u32, ret: u64) -> Vec<Frame> {
        if id == 0 {
            return Vec::new();
        }
        if let Some(frames) = self.cache.get(&(pid, id, ret)) {
            return frames.clone();
        }
        let Ok(trace) = self.map.get(&(id - 1), 0) else {
            return Vec::new();
        };
        let addrs = with_leaf_caller(trace.frames().iter().map(|f| f.ip).collect(), ret);
        let frames: Vec<Frame> = addrs
            .iter()
            .map(|&addr| Frame {
                addr,
                function: None,
                file: None,
                line: None,
            })
            .collect();
        let opts = NormalizeOpts {
            sorted_addrs: false,
            // Real paths, not /proc/<pid>/map_files links: they outlive the process.
            map_files: false,
            ..Default::default()
        };
        let debug = std::env::var_os("TCP_TRACE_DEBUG_STACKS").is_some();
        // Every frame but the innermost is a return address: the call it returns from ends one
        // byte earlier, and that is the line to report.
        let lookup: Vec<u64> = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
            .collect();
        let normalized = match self
            .normalizer
            .normalize_user_addrs_opts(pid.into(), &lookup, &opts)
        {
            Ok(n) => n,
            Err(e) => {
                if debug {
                    eprintln!("stacks: normalize pid {pid}: {e:#}");
                }
                return frames;
            }
        };
        let mut out = Vec::with_capacity(frames.len());
        for (mut frame, (offset, meta)) in frames.into_iter().zip(&normalized.outputs) {
            let Some(UserMeta::Elf(elf)) = normalized.meta.get(*meta) else {
                out.push(frame);
                continue;
            };
            let source = Source::Elf(Elf::new(&elf.path));
            let sym = match self
                .symbolizer
                .symbolize_single(&source, Input::FileOffset(*offset))
            {
                Ok(sym) => sym,
                Err(e) => {
                    if debug {
                        eprintln!("stacks: symbolize {}: {e:#}", elf.path.display());
                    }
                    out.push(frame);
                    continue;
                }
            };
            let Symbolized::Sym(sym) = sym else {
                out.push(frame);
                continue;
            };
            // Functions inlined at this address come first, innermost first: each is a frame
            // of its own in the source, at the same machine address.
            for inlined in sym.inlined.iter().rev() {
                out.push(Frame {
                    addr: frame.addr,
                    function: Some(inlined.name.to_string()),
                    file: inlined
                        .code_info
                        .as_ref()
                        .map(|ci| ci.to_path().display().to_string()),
                    line: inlined.code_info.as_ref().and_then(|ci| ci.line),
                });
            }
            frame.function = Some(sym.name.to_string());
            if let Some(ci) = &sym.code_info {
                frame.file = Some(ci.to_path().display().to_string());
                frame.line = ci.line;
            }
            out.push(frame);
        }
        let frames = out;
        // Bounded: stacks repeat (the same close() call site), and a busy host has few sites.
        if self.cache.len() > 4096 {
            self.cache.clear();
        }
        self.cache.insert((pid, id, ret), frames.clone());
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skipped_caller_is_put_back_once() {
        assert_eq!(with_leaf_caller(vec![1, 3, 4], 2), vec![1, 2, 3, 4]);
        assert_eq!(with_leaf_caller(vec![1, 2, 3], 2), vec![1, 2, 3]);
        assert_eq!(with_leaf_caller(vec![1, 3], 0), vec![1, 3]);
        assert_eq!(with_leaf_caller(vec![], 2), Vec::<u64>::new());
    }

    #[test]
    fn runtime_frames_are_skipped_and_frames_describe_themselves() {
        let f = |name: &str| Frame {
            addr: 0x1000,
            function: Some(name.into()),
            file: Some("src/server.rs".into()),
            line: Some(42),
        };
        assert!(is_runtime_frame(&f("__close")));
        assert!(is_runtime_frame(&f(
            "core::ptr::drop_in_place<std::net::TcpStream>"
        )));
        assert!(!is_runtime_frame(&f("server::handle_client")));
        assert_eq!(
            f("server::handle_client").describe(),
            "server::handle_client (src/server.rs:42)"
        );
        let bare = Frame {
            addr: 0xdead,
            function: None,
            file: None,
            line: None,
        };
        assert!(is_runtime_frame(&bare));
        assert_eq!(bare.describe(), "0xdead");
    }
}
