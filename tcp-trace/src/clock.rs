//! Clocks: events carry CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns); people read UTC.

/// `clock` now, in nanoseconds.
pub(crate) fn now_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; the clocks used here always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_REALTIME - CLOCK_MONOTONIC now, in nanoseconds.
pub(crate) fn realtime_minus_monotonic_ns() -> i64 {
    // time_t and c_long are i64 here but not on every target.
    #[allow(clippy::unnecessary_cast)]
    fn now(clock: libc::clockid_t) -> i64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid, writable timespec; both clocks always exist on Linux.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        (ts.tv_sec as i64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as i64)
    }
    // Bracket the realtime read with two monotonic ones and take their midpoint.
    let m1 = now(libc::CLOCK_MONOTONIC);
    let r = now(libc::CLOCK_REALTIME);
    let m2 = now(libc::CLOCK_MONOTONIC);
    r.saturating_sub(m1.saturating_add(m2.saturating_sub(m1) / 2))
}

/// `HH:MM:SS.micros` (UTC).
pub(crate) fn time_of_day(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        micros
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_of_day_formats() {
        assert_eq!(time_of_day(3_723_000_004_000), "01:02:03.000004");
    }

    #[test]
    fn the_clocks_move_forward_together() {
        let a = now_ns(libc::CLOCK_MONOTONIC);
        let b = now_ns(libc::CLOCK_MONOTONIC);
        assert!(b >= a);
        let offset = realtime_minus_monotonic_ns();
        let wall = now_ns(libc::CLOCK_REALTIME) as i64;
        let mono = now_ns(libc::CLOCK_MONOTONIC) as i64;
        // Read at slightly different moments: within a second of each other.
        assert!((mono + offset - wall).abs() < 1_000_000_000);
    }
}
