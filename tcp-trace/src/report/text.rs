//! The human text forms.

use crate::decode::{Hook, KState, TraceEvent};

/// One human line per event.
pub(crate) fn human_line(ev: &TraceEvent, unix_ns: u64) -> String {
    // `~`: a provisional owner (see the README's "Owners"); the flow's report names the final one.
    let who = match &ev.owner {
        Some(o) if !o.is_definite() => format!("~{}/{}", o.pid, o.comm),
        Some(o) => format!("{}/{}", o.pid, o.comm),
        None => format!("?({}/{})", ev.pid, ev.comm),
    };
    let flow = match (ev.local, ev.remote) {
        (Some(l), Some(r)) => format!("{l} > {r}"),
        _ => "-".into(),
    };
    let mut detail = String::new();
    match ev.hook {
        Hook::InetSockSetState => {
            detail = format!(
                "{} -> {}",
                ev.state.map_or("?", KState::name),
                ev.new_state.map_or("?", KState::name)
            )
        }
        Hook::TcpTimeWait => {
            detail = format!(
                "{} -> TW({}) timeo={}j",
                ev.state.map_or("?", KState::name),
                ev.new_state.map_or("?", KState::name),
                ev.timeo_jiffies.unwrap_or(0)
            )
        }
        Hook::TcpTimewaitStateProcess => {
            if let Some(s) = &ev.segment {
                detail = format!(
                    "TW({}) <- [{}] seq={} len={} rcv_nxt={}",
                    ev.state.map_or("?", KState::name),
                    s.flags,
                    s.seq,
                    s.len,
                    s.tw_rcv_nxt
                );
            }
        }
        Hook::TcpTimewaitStateProcessReturn => {
            detail = format!(
                "TW({}) => {}",
                ev.new_state.map_or("?", KState::name),
                ev.tw_status
                    .map_or_else(|| "?".to_string(), |s| s.to_string())
            )
        }
        _ => {
            if let Some(s) = &ev.state {
                detail = s.to_string();
            }
        }
    }
    if let Some(c) = &ev.close {
        detail.push_str(&format!(
            " unread={} unsent={} unacked={} linger={}",
            c.unread,
            c.unsent,
            c.unacked,
            if c.linger {
                format!("on({}j)", c.linger_jiffies)
            } else {
                "off".into()
            }
        ));
    }
    if let Some(r) = &ev.rst_reason {
        detail.push_str(&format!(" reason={r}"));
    }
    if ev.rst_active == Some(false) {
        detail.push_str(" (reply)");
    }
    if let Some(frame) = ev
        .user_stack
        .as_ref()
        .and_then(|s| s.iter().find(|f| !crate::stacks::is_runtime_frame(f)))
    {
        detail.push_str(&format!(" close() at {}", frame.describe()));
    }
    let on_cpu = match &ev.owner {
        Some(o) if o.pid != ev.pid => format!(" [on cpu: {}/{}]", ev.pid, ev.comm),
        _ => String::new(),
    };
    format!(
        "{}  {:<22} {:<47} {:<10} {}{}",
        crate::clock::time_of_day(unix_ns),
        who,
        flow,
        ev.hook.short(),
        detail.trim_start(),
        on_cpu
    )
}
