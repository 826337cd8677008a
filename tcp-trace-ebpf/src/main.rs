//! tcp-trace kernel side. Each program reads a few fields, fills one fixed-size `Event` and submits
//! it to the `EVENTS` ring buffer; everything else happens in userspace.
//!
//! There are no CO-RE relocations in Rust eBPF, so every struct offset comes from `CONFIG`, a
//! read-only global the loader fills in from the running kernel's BTF. Read-only globals are frozen
//! before verification, so the verifier treats them as constants (and prunes branches on them).
//!
//! Every function hook exists twice, as kprobe and fentry (and kretprobe/fexit for the return of
//! tcp_timewait_state_process); every tracepoint twice, as tp_btf and raw_tp. Userspace loads one
//! form per hook.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only when the workspace is checked as a whole; the real object is built
    // for bpfel-unknown-none by tcp-trace's build.rs.
}
