//! User call stacks of close(): the kernel side records them (syscalls:sys_enter_close, opt-in)
//! by frame pointers into a stack-trace map; here they are read back and symbolized to function
//! and file:line with blazesym, from the process's own mappings and debug info. That has to
//! happen while the process still exists, so it is done as the event arrives.

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
pub struct Frame {
    pub addr: u64,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

impl Frame {
    /// `function (file:line)`, as much as is known.
    pub fn describe(&self) -> String {
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
pub fn is_runtime_frame(f: &Frame) -> bool {
    let Some(name) = &f.function else {
        return true;
    };
    const RUNTIME: [&str; 12] = [
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

pub struct StackResolver {
    map: StackTraceMap<MapData>,
    normalizer: Normalizer,
    symbolizer: Symbolizer,
    cache: HashMap<(u32, u32), Vec<Frame>>,
}

impl StackResolver {
    pub fn new(map: StackTraceMap<MapData>) -> Self {
        Self {
            map,
            // Keep each process's memory map once read: a process that exits right after its
            // close() (while an earlier stack is still being symbolized) still gets names.
            normalizer: Normalizer::builder().enable_vma_caching(true).build(),
            symbolizer: Symbolizer::new(),
            cache: HashMap::new(),
        }
    }

    /// The stack `id` (as the event carries it: 1 + map id) of a thread of process `pid`.
    ///
    /// Addresses are first normalized to (file, offset) through /proc/<pid>/maps, which is
    /// quick, and then symbolized from the files themselves, which can take a while the first
    /// time (DWARF) but no longer needs the process: short-lived programs still get names.
    pub fn resolve(&mut self, pid: u32, id: u32) -> Vec<Frame> {
        if id == 0 {
            return Vec::new();
        }
        if let Some(frames) = self.cache.get(&(pid, id)) {
            return frames.clone();
        }
        let Ok(trace) = self.map.get(&(id - 1), 0) else {
            return Vec::new();
        };
        let addrs: Vec<u64> = trace.frames().iter().map(|f| f.ip).collect();
        let mut frames: Vec<Frame> = addrs
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
        let normalized = match self
            .normalizer
            .normalize_user_addrs_opts(pid.into(), &addrs, &opts)
        {
            Ok(n) => n,
            Err(e) => {
                if debug {
                    eprintln!("stacks: normalize pid {pid}: {e:#}");
                }
                return frames;
            }
        };
        for (frame, (offset, meta)) in frames.iter_mut().zip(&normalized.outputs) {
            let Some(UserMeta::Elf(elf)) = normalized.meta.get(*meta) else {
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
                    continue;
                }
            };
            if let Symbolized::Sym(sym) = sym {
                frame.function = Some(sym.name.to_string());
                if let Some(ci) = &sym.code_info {
                    frame.file = Some(ci.to_path().display().to_string());
                    frame.line = ci.line;
                }
            }
        }
        // Bounded: stacks repeat (the same close() call site), and a busy host has few sites.
        if self.cache.len() > 4096 {
            self.cache.clear();
        }
        self.cache.insert((pid, id), frames.clone());
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
