//! Running qemu: console (first serial port) piped to us and into a log file, results (second
//! serial port) into a file, a wall-clock timeout, and parsing the framed exit status.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What to run.
pub struct QemuConfig<'a> {
    pub qemu: &'a Path,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub memory_mib: u32,
    pub cpus: u32,
    pub console_log: &'a Path,
    pub result_path: &'a Path,
    pub timeout: Duration,
    /// Copy the console to our stdout as it arrives.
    pub stream_console: bool,
}

/// What happened.
pub struct QemuRun {
    /// The console with `\r` removed.
    pub console: String,
    /// Raw bytes of the second serial port.
    pub result_channel: Vec<u8>,
    /// qemu's exit status; `None` when it was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
}

/// The qemu command line for `cfg`: no default devices, console on stdio, results to a file.
/// TCG (software emulation) unless `TCP_TRACE_VM_KVM=1`: on these machines /dev/kvm exists but
/// guests die in it with "KVM internal error ... emulation failure".
pub fn command(cfg: &QemuConfig<'_>) -> Command {
    let mut cmd = Command::new(cfg.qemu);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    if std::env::var_os("TCP_TRACE_VM_KVM").is_some_and(|v| v == "1") {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg"]);
    }
    cmd.args([
        "-m",
        &cfg.memory_mib.to_string(),
        "-smp",
        &cfg.cpus.to_string(),
    ])
    .arg("-kernel")
    .arg(cfg.vmlinuz)
    .arg("-initrd")
    .arg(cfg.initrd)
    .args(["-append", cfg.cmdline])
    .args(["-serial", "stdio"])
    .arg("-serial")
    .arg(format!("file:{}", cfg.result_path.display()));
    cmd
}

/// Boots and waits for qemu to exit or the timeout to pass (then kills it).
pub fn run(cfg: &QemuConfig<'_>) -> Result<QemuRun> {
    let _ = fs::remove_file(cfg.result_path);
    let mut cmd = command(cfg);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", cfg.qemu.display()))?;
    let mut stdout = child.stdout.take().context("qemu stdout")?;
    let mut stderr = child.stderr.take().context("qemu stderr")?;
    let mut log = fs::File::create(cfg.console_log)
        .with_context(|| format!("creating {}", cfg.console_log.display()))?;
    let stream = cfg.stream_console;
    let console_reader = thread::spawn(move || -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        let mut out = std::io::stdout();
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
                    let _ = log.write_all(&chunk);
                    if stream {
                        let _ = out.write_all(&chunk);
                        let _ = out.flush();
                    }
                    all.extend_from_slice(&chunk);
                }
            }
        }
        all
    });
    let stderr_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for qemu")? {
            break Some(st);
        }
        if start.elapsed() >= cfg.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let mut console = console_reader.join().unwrap_or_default();
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    if !qemu_stderr.is_empty() {
        console.extend_from_slice(b"\n[qemu stderr]\n");
        console.extend_from_slice(&qemu_stderr);
        let _ = fs::OpenOptions::new()
            .append(true)
            .open(cfg.console_log)
            .and_then(|mut f| {
                f.write_all(b"\n[qemu stderr]\n")
                    .and_then(|()| f.write_all(&qemu_stderr))
            });
    }
    let result_channel = fs::read(cfg.result_path).unwrap_or_default();
    Ok(QemuRun {
        console: String::from_utf8_lossy(&console).into_owned(),
        result_channel,
        status,
        elapsed,
    })
}

/// Splits the second serial port's bytes into the job's result file contents and its exit status:
/// the last non-empty line must be `{"vm_exit": N}`. `None` when the guest never wrote it.
pub fn parse_result_channel(bytes: &[u8]) -> Option<(String, i32)> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    let (body, last) = match text.rfind('\n') {
        Some(i) => (&text[..=i], &text[i + 1..]),
        None => ("", text),
    };
    let v: serde_json::Value = serde_json::from_str(last.trim()).ok()?;
    let code = v.get("vm_exit")?.as_i64()?;
    Some((body.to_owned(), i32::try_from(code).ok()?))
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A fresh directory for one boot's files.
pub fn run_dir(kernel: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tcp-trace-vm-{kernel}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_channel_framing() {
        assert_eq!(
            parse_result_channel(b"{\"vm_exit\": 0}\n"),
            Some((String::new(), 0))
        );
        assert_eq!(
            parse_result_channel(b"{\"a\":1}\n{\"b\":2}\n{\"vm_exit\": 3}\n"),
            Some(("{\"a\":1}\n{\"b\":2}\n".to_owned(), 3))
        );
        // A job result that itself ends without a newline got one from /init.
        assert_eq!(
            parse_result_channel(b"x\n{\"vm_exit\": 1}"),
            Some(("x\n".to_owned(), 1))
        );
        assert_eq!(parse_result_channel(b""), None);
        assert_eq!(parse_result_channel(b"partial result\n"), None);
        assert_eq!(
            parse_result_channel(b"{\"vm_exit\": 0}\ntrailing junk\n"),
            None
        );
    }

    #[test]
    fn tail_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
