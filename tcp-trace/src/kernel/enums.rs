//! Kernel enum values as the model's enums: what decode puts in events. The numbers come from
//! the running kernel's BTF (see [`super::btf::KernelFacts`]), the names from the model.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::model::{RstReason, TwStatus};

/// An `enum sk_rst_reason` value: one the model knows by name, or a number this build has no
/// name for. Mapped once per kernel from its BTF names ([`crate::kernel::btf::KernelFacts`]):
/// the numbers shift between releases, the names do not.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KReason {
    Known(RstReason),
    Unknown(u32),
}

impl KReason {
    pub(crate) fn known(self) -> Option<RstReason> {
        match self {
            KReason::Known(r) => Some(r),
            KReason::Unknown(_) => None,
        }
    }
}

impl fmt::Display for KReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KReason::Known(r) => f.write_str(r.kernel_name()),
            KReason::Unknown(n) => write!(f, "reason#{n}"),
        }
    }
}

impl fmt::Debug for KReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for KReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An `enum tcp_tw_status` value (what tcp_timewait_state_process() returned), mapped by name
/// like [`KReason`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KTwStatus {
    Known(TwStatus),
    Unknown(i32),
}

impl KTwStatus {
    pub(crate) fn known(self) -> Option<TwStatus> {
        match self {
            KTwStatus::Known(s) => Some(s),
            KTwStatus::Unknown(_) => None,
        }
    }
}

impl fmt::Display for KTwStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KTwStatus::Known(s) => f.write_str(s.kernel_name()),
            KTwStatus::Unknown(n) => write!(f, "status#{n}"),
        }
    }
}

impl fmt::Debug for KTwStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for KTwStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_as_the_kernel_names_them() {
        assert_eq!(
            KReason::Known(RstReason::TcpAbortOnClose).to_string(),
            "TCP_ABORT_ON_CLOSE"
        );
        assert_eq!(KReason::Unknown(77).to_string(), "reason#77");
        assert_eq!(KTwStatus::Unknown(9).to_string(), "status#9");
        assert_eq!(
            serde_json::to_string(&KTwStatus::Known(TwStatus::AckOow)).unwrap(),
            "\"ACK_OOW\""
        );
    }
}

/// Conversions from the text form, for building events in tests.
#[cfg(test)]
mod from_text {
    use super::*;

    impl From<&str> for KReason {
        fn from(name: &str) -> KReason {
            KReason::Known(
                RstReason::from_kernel_name(name)
                    .unwrap_or_else(|| panic!("not an RST reason: {name}")),
            )
        }
    }

    impl From<&str> for KTwStatus {
        fn from(name: &str) -> KTwStatus {
            KTwStatus::Known(
                TwStatus::from_kernel_name(name)
                    .unwrap_or_else(|| panic!("not a tcp_tw_status: {name}")),
            )
        }
    }
}
