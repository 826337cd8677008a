//! What the model is parameterised by: the kernel generation (where behaviour differs between
//! releases) and the sysctls / socket options that steer teardown.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::outcome::{RstReason, TwStatus};

/// TCP_TIMEWAIT_LEN: a TIME_WAIT minisocket's lifetime, 60 s.
pub(crate) const TCP_TIMEWAIT_LEN_MS: u64 = 60_000;

/// TCP_FIN_TIMEOUT_MAX (120 s): do_tcp_setsockopt(TCP_LINGER2) caps linger2 here. (From the
/// setsockopt code, not from the teardown doc.)
pub(crate) const TCP_FIN_TIMEOUT_MAX_SECS: i32 = 120;

/// A kernel release, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KernelVersion {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) patch: u32,
}

impl KernelVersion {
    pub(crate) const fn new(major: u32, minor: u32, patch: u32) -> KernelVersion {
        KernelVersion {
            major,
            minor,
            patch,
        }
    }

    fn at_least(self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Parses `6.12`, `6.12.3`, or a `uname -r` string such as `6.12.3-1-amd64` / `6.18.0-rc2`.
impl FromStr for KernelVersion {
    type Err = ParseKernelVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ParseKernelVersionError(s.to_string());
        let numeric = s
            .trim()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .unwrap_or_default();
        let mut parts = numeric.split('.');
        let mut next = |required: bool| -> Result<u32, ParseKernelVersionError> {
            match parts.next() {
                Some(part) if !part.is_empty() => part.parse().map_err(|_| error()),
                _ if required => Err(error()),
                _ => Ok(0),
            }
        };
        let major = next(true)?;
        let minor = next(true)?;
        let patch = next(false)?;
        Ok(KernelVersion::new(major, minor, patch))
    }
}

/// A kernel version string that did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseKernelVersionError(pub String);

impl fmt::Display for ParseKernelVersionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot read a kernel version from `{}` (want e.g. 6.12 or 6.12.3-1-amd64)",
            self.0
        )
    }
}

impl std::error::Error for ParseKernelVersionError {}

/// Where teardown behaviour (or what a tracer can see of it) differs between kernel releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelGeneration {
    pub(crate) version: KernelVersion,
    /// 6.10+: reply resets (tcp_v4_send_reset) carry an `enum sk_rst_reason`: NO_SOCKET,
    /// TCP_ABORT_ON_DATA, TCP_TIMEWAIT_SOCKET... Before that the tracepoint has no reason.
    pub(crate) passive_reset_reasons: bool,
    /// 6.12+: tcp_send_active_reset() callers name their reason (TCP_ABORT_ON_CLOSE,
    /// TCP_ABORT_ON_LINGER, TCP_ABORT_ON_MEMORY, TCP_STATE, TCP_DISCONNECT_WITH_DATA). On 6.10 and
    /// 6.11 the argument exists but every active reset passes NOT_SPECIFIED.
    pub(crate) active_reset_reasons: bool,
    /// 6.15+: tcp_timewait_state_process() returns TCP_TW_ACK_OOW (4) for its rate-limited
    /// out-of-window ACKs; before, those are TCP_TW_ACK.
    pub(crate) tw_ack_oow: bool,
    /// 6.10+: the new incarnation's ISN leaves tcp_timewait_state_process() through a
    /// `u32 *tw_isn` argument rather than TCP_SKB_CB(skb)->tcp_tw_isn. (The doc's signature table
    /// samples 6.12; the exact first release is taken from the tracker issue.)
    pub(crate) tw_isn_argument: bool,
    /// Whether a RST that tcp_rfc1337=1 tells TIME_WAIT to ignore still re-arms the 60 s timer.
    /// Not on 6.x (the re-arm is in the bare-ACK branch only); older kernels re-armed
    /// unconditionally. The exact release of the change is (unverified); the model says pre-6.0.
    pub(crate) rfc1337_rst_rearms_tw_timer: bool,
    /// "tcp: fix __tcp_close() to only send RST when required" (mainline 6.18, backported to
    /// stables in Oct 2025 at point releases that are (unverified)): with it, close() resets only
    /// if some queued skb ends (minus FIN) after copied_seq; without it, any queued payload counts,
    /// read or not. The version constructor sets it for 6.18+ only: callers that know their
    /// stable kernel has the backport should set it themselves.
    pub(crate) close_unread_fix: bool,
}

impl KernelGeneration {
    /// The generation of a given release.
    pub(crate) fn from_version(major: u32, minor: u32, patch: u32) -> KernelGeneration {
        KernelGeneration::for_release(KernelVersion::new(major, minor, patch))
    }

    /// The generation of a given release.
    pub fn for_release(version: KernelVersion) -> KernelGeneration {
        KernelGeneration {
            version,
            passive_reset_reasons: version.at_least(6, 10),
            active_reset_reasons: version.at_least(6, 12),
            tw_ack_oow: version.at_least(6, 15),
            tw_isn_argument: version.at_least(6, 10),
            rfc1337_rst_rearms_tw_timer: !version.at_least(6, 0),
            close_unread_fix: version.at_least(6, 18),
        }
    }

    /// This generation with what the running kernel shows of itself (its BTF) in place of what
    /// the release number suggests: a backport, or a distribution kernel that differs from
    /// mainline, is then modelled as it is.
    pub(crate) fn with_detected(mut self, d: DetectedKernel) -> KernelGeneration {
        if let Some(v) = d.passive_reset_reasons {
            self.passive_reset_reasons = v;
        }
        if d.active_reset_argument == Some(false) {
            // No reason argument: no caller can name one. (With it, 6.10 and 6.11 still pass
            // NOT_SPECIFIED everywhere, which BTF cannot tell: the release decides.)
            self.active_reset_reasons = false;
        }
        if let Some(v) = d.tw_ack_oow {
            self.tw_ack_oow = v;
        }
        if let Some(v) = d.tw_isn_argument {
            self.tw_isn_argument = v;
        }
        self
    }

    /// The reason a tcp_send_active_reset() call shows, given the reason 6.12+ passes.
    pub fn active_reset_reason(&self, named: RstReason) -> Option<RstReason> {
        if self.active_reset_reasons {
            Some(named)
        } else if self.passive_reset_reasons {
            Some(RstReason::NotSpecified)
        } else {
            None
        }
    }

    /// The reason a reply reset (tcp_v4_send_reset) shows, given the reason 6.10+ passes.
    pub(crate) fn reply_reset_reason(&self, named: RstReason) -> Option<RstReason> {
        self.passive_reset_reasons.then_some(named)
    }

    /// The status of a rate-limited out-of-window ACK from a TIME_WAIT minisocket.
    pub(crate) fn tw_oow_ack_status(&self) -> TwStatus {
        if self.tw_ack_oow {
            TwStatus::AckOow
        } else {
            TwStatus::Ack
        }
    }
}

/// Kernel facts that the running kernel's BTF shows directly (None: BTF did not say), which
/// [`KernelGeneration::with_detected`] prefers over the release number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DetectedKernel {
    /// The tcp_send_reset tracepoint has a `reason` argument.
    pub(crate) passive_reset_reasons: Option<bool>,
    /// tcp_send_active_reset() has a `reason` argument.
    pub(crate) active_reset_argument: Option<bool>,
    /// `enum tcp_tw_status` has TCP_TW_ACK_OOW.
    pub(crate) tw_ack_oow: Option<bool>,
    /// tcp_timewait_state_process() has a `tw_isn` argument.
    pub(crate) tw_isn_argument: Option<bool>,
}

/// Everything the model's decisions depend on besides the state and the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelParams {
    pub kernel: KernelGeneration,
    /// net.ipv4.tcp_fin_timeout, seconds (default 60).
    pub tcp_fin_timeout_secs: u32,
    /// net.ipv4.tcp_rfc1337 (default 0): 1 makes TIME_WAIT ignore RSTs instead of dying.
    pub tcp_rfc1337: bool,
    /// net.ipv4.tcp_orphan_retries (default 0, which means 8 while the peer seems alive).
    pub tcp_orphan_retries: u32,
    /// The socket's TCP_LINGER2, seconds: < 0 resets an orphan FIN_WAIT2 at once, 0 uses
    /// tcp_fin_timeout, > 0 replaces it (capped at 120 s).
    pub tcp_linger2_secs: i32,
    /// The connection's RTO in ms (default 200, TCP_RTO_MIN); FIN_WAIT2 timeouts are floored at
    /// 3.5 RTO.
    pub rto_ms: u32,
    /// Whether a listener owns the minisocket's local port: decides where a new SYN into
    /// TIME_WAIT goes (default true: TIME_WAIT usually sits on the server side).
    pub listener_on_port: bool,
}

impl ModelParams {
    /// Kernel `major.minor.patch` with every sysctl at its default.
    pub(crate) fn for_kernel(major: u32, minor: u32, patch: u32) -> ModelParams {
        ModelParams::for_generation(KernelGeneration::from_version(major, minor, patch))
    }

    /// A kernel generation with every sysctl at its default.
    pub fn for_generation(kernel: KernelGeneration) -> ModelParams {
        ModelParams {
            kernel,
            tcp_fin_timeout_secs: 60,
            tcp_rfc1337: false,
            tcp_orphan_retries: 0,
            tcp_linger2_secs: 0,
            rto_ms: 200,
            listener_on_port: true,
        }
    }

    /// These parameters with the kernel's own facts preferred (see
    /// [`KernelGeneration::with_detected`]).
    pub(crate) fn with_detected(mut self, d: DetectedKernel) -> ModelParams {
        self.kernel = self.kernel.with_detected(d);
        self
    }

    /// tcp_fin_time(): (linger2 ?: tcp_fin_timeout), floored at 3.5 RTO, in ms. With linger2 < 0
    /// the kernel's callers test that case first, so only the floor is left here.
    pub(crate) fn fin_time_ms(&self) -> u64 {
        let secs = if self.tcp_linger2_secs != 0 {
            i64::from(self.tcp_linger2_secs.min(TCP_FIN_TIMEOUT_MAX_SECS))
        } else {
            i64::from(self.tcp_fin_timeout_secs)
        };
        let ms = u64::try_from(secs).unwrap_or(0) * 1000;
        ms.max(self.rto_floor_ms())
    }

    /// 3.5 RTO, `(rto << 2) - (rto >> 1)`: the floor of tcp_fin_time() and of tcp_time_wait()'s
    /// timeout.
    pub(crate) fn rto_floor_ms(&self) -> u64 {
        let rto = u64::from(self.rto_ms);
        (rto << 2) - (rto >> 1)
    }

    /// tcp_orphan_retries(): the sysctl, where 0 means 8 while the peer seems alive.
    pub(crate) fn orphan_retries(&self, alive: bool) -> u32 {
        if self.tcp_orphan_retries == 0 && alive {
            8
        } else {
            self.tcp_orphan_retries
        }
    }
}

impl Default for ModelParams {
    /// Kernel 6.12 (the current longterm release) with default sysctls.
    fn default() -> ModelParams {
        ModelParams::for_kernel(6, 12, 0)
    }
}

impl fmt::Display for ModelParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "kernel {} (reset reasons: reply {}, active {}; TW ACK_OOW: {}; close() unread fix: {}); \
             tcp_fin_timeout={}s TCP_LINGER2={}s tcp_rfc1337={} tcp_orphan_retries={} rto={}ms \
             listener on port: {}",
            self.kernel.version,
            yes_no(self.kernel.passive_reset_reasons),
            yes_no(self.kernel.active_reset_reasons),
            yes_no(self.kernel.tw_ack_oow),
            yes_no(self.kernel.close_unread_fix),
            self.tcp_fin_timeout_secs,
            self.tcp_linger2_secs,
            u8::from(self.tcp_rfc1337),
            self.tcp_orphan_retries,
            self.rto_ms,
            yes_no(self.listener_on_port),
        )
    }
}
