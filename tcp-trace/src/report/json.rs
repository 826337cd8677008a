//! `--json` lines: one object per line, its `type` first.

use std::io::Write;

use anyhow::Result;

/// One `--json` line: the object's own fields after `type` (and `unix_ns`, `advice` where they
/// apply), serialized straight into the output.
#[derive(serde::Serialize)]
pub(crate) struct JsonLine<'a, T: serde::Serialize> {
    pub(crate) r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) unix_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) advice: Option<&'a str>,
    /// The owner's cgroup and the container or unit it names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cgroup: Option<&'a crate::cgroups::Identity>,
    #[serde(flatten)]
    pub(crate) body: &'a T,
}

pub(crate) fn json_line<T: serde::Serialize>(
    out: &mut impl Write,
    line: &JsonLine<'_, T>,
) -> Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")?;
    Ok(())
}
