//! The VM runner: boots Debian kernels (which have kprobes, fentry and BTF, unlike the host's) under
//! qemu with a busybox initramfs, runs a job inside and collects its exit status, its result file
//! and its console log.
//!
//! - [`KERNELS`] is the catalogue (`catalogue.rs`); adding a kernel is one line there.
//! - [`boot`] is the library entry point: set-up (host tools, kernel download, cached), initramfs,
//!   qemu, result. `cargo xtask vm-run` ([`run`]) is a thin command line over it.
//!
//! Inside the guest, `/init` mounts proc, sys, devtmpfs, tmpfs on /tmp and /run, tracefs, debugfs,
//! bpffs and cgroup2, loads the job's modules (dependencies first), brings up `lo`, and runs the
//! job script with `sh` in `/root`, its output on the console (ttyS0). The job may write
//! machine-readable results to the file named by `$VM_RESULT`; after the job, `/init` copies that
//! file to the second serial port (ttyS1, a file on the host) followed by a last line
//! `{"vm_exit": N}`, and powers off. `$VM_KERNEL` holds the catalogue name.
//!
//! Cache (`$TCP_TRACE_CACHE`, else `$XDG_CACHE_HOME/tcp-trace`, else `~/.cache/tcp-trace`):
//! `kernels/<package>/{vmlinuz,config,release,version,.complete}`, `modules/<release>/` as shipped
//! and `ko/<module>.ko` decompressed on first use. Each boot works in a temporary directory
//! (initrd, console log, result channel) that is removed on success and kept on failure, or always
//! kept with `TCP_TRACE_VM_KEEP=1`.
//!
//! qemu runs with TCG (software emulation): /dev/kvm exists on these machines but guests die in it
//! ("KVM internal error ... emulation failure"); `TCP_TRACE_VM_KVM=1` tries KVM anyway. A boot to
//! power-off takes 3-9 s. The result channel moves about 400 KB/s, so keep results to a few MB.
//!
//! Guest tooling is busybox 1.35: `ip netns` and `ip link add ... peer name X` are not supported.
//! What works: `unshare -n sleep 600 & pid=$!; ip link add v0 type veth` (the peer is `veth0`),
//! `ip link set veth0 name v1; ip link set v1 netns $pid; nsenter -t $pid -n ip ...`.

mod catalogue;
mod elf;
pub(crate) mod host;
mod initramfs;
mod kernel;
mod modules;
mod qemu;

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

#[allow(unused_imports, reason = "library API for the vm-test task")]
pub use catalogue::kernel_spec;
pub use catalogue::{KERNELS, KernelSpec, kernels_for};
pub use host::{HostTools, ensure_host_tools};
pub use kernel::{PreparedKernel, cached_kernels, newest_available, prepare_kernel};
pub use modules::DEFAULT_MODULES;

use host::say;
use initramfs::{Data, shell_quote};

/// Where the `binary` of a [`GuestJob`] lands in the guest.
pub const GUEST_BINARY: &str = "/bin/tcp-trace";

/// A file to put into the guest.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Absolute path in the guest; parent directories are created.
    pub guest_path: String,
    pub source: FileSource,
    /// Permission bits, e.g. 0o755 for executables.
    pub mode: u32,
}

#[derive(Debug, Clone)]
#[allow(dead_code, reason = "Bytes is library API for the vm-test task")]
pub enum FileSource {
    /// Read from the host when the initramfs is built.
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl GuestFile {
    /// A host file at `guest_path`, keeping its executable bits.
    pub fn host(host: impl Into<PathBuf>, guest_path: impl Into<String>) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let host = host.into();
        let exec = fs::metadata(&host)
            .map(|m| m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        Self {
            guest_path: guest_path.into(),
            source: FileSource::Host(host),
            mode: if exec { 0o755 } else { 0o644 },
        }
    }

    /// A file made of `bytes`.
    #[allow(dead_code, reason = "library API for the vm-test task")]
    pub fn bytes(guest_path: impl Into<String>, bytes: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            guest_path: guest_path.into(),
            source: FileSource::Bytes(bytes.into()),
            mode,
        }
    }
}

/// What to run in the guest.
#[derive(Debug, Clone)]
pub struct GuestJob {
    /// A shell script run by busybox `sh` in `/root`; its exit status is the job's.
    pub script: String,
    /// A statically linked executable to install as `/bin/tcp-trace`.
    pub binary: Option<PathBuf>,
    /// More files to put into the guest.
    pub files: Vec<GuestFile>,
    /// Kernel modules to load (their dependencies come along); missing ones are warnings.
    pub modules: Vec<String>,
    /// Environment for the job (besides `VM_RESULT` and `VM_KERNEL`).
    pub env: Vec<(String, String)>,
    /// Wall-clock limit for the whole boot.
    pub timeout: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Copy the guest console to stdout as it arrives (it is captured either way).
    pub stream_console: bool,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
}

impl GuestJob {
    /// A job running `script`, with the default modules, 300 s timeout, 1 GiB and 2 CPUs.
    pub fn script(script: impl Into<String>) -> Self {
        Self {
            script: script.into(),
            binary: None,
            files: Vec::new(),
            modules: DEFAULT_MODULES.iter().map(|m| m.to_string()).collect(),
            env: Vec::new(),
            timeout: Duration::from_secs(300),
            memory_mib: 1024,
            cpus: 2,
            stream_console: false,
            extra_cmdline: String::new(),
        }
    }

    /// A job running one command (`argv[0]` looked up on the guest's PATH).
    pub fn command<S: AsRef<str>>(argv: &[S]) -> Self {
        let line: Vec<String> = argv.iter().map(|a| shell_quote(a.as_ref())).collect();
        Self::script(format!("{}\n", line.join(" ")))
    }

    pub fn with_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    pub fn with_file(mut self, file: GuestFile) -> Self {
        self.files.push(file);
        self
    }
}

/// What the modules step did.
#[derive(Debug, Clone, Default)]
pub struct ModuleReport {
    /// Loaded with insmod, in this order (dependencies included).
    pub loaded: Vec<String>,
    /// Built into this kernel.
    pub builtin: Vec<String>,
    /// Requested but unavailable, with the reason.
    pub missing: Vec<(String, String)>,
}

/// The result of one boot that got as far as running the job.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// Catalogue name (`6.12`).
    pub kernel: String,
    pub package: String,
    /// `uname -r` of the guest.
    pub release: String,
    /// The job's exit status.
    pub exit_code: i32,
    /// What the job wrote to `$VM_RESULT` (a final newline is added if it lacked one).
    pub result: String,
    /// Everything the guest console showed (kernel messages, init, the job's stdout/stderr).
    pub console: String,
    /// From starting qemu to its exit.
    pub elapsed: Duration,
    pub modules: ModuleReport,
}

impl GuestOutcome {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        qemu::tail(&self.console, n)
    }
}

/// Boots the newest cached-or-downloadable kernel for `kernel` and runs `guest` in it. Installs
/// host tools and downloads the kernel first when needed. An `Ok` outcome may still carry a
/// non-zero `exit_code`; errors are for set-up failures, timeouts and guests that never reported
/// an exit status (their message includes the console tail).
pub fn boot(kernel: &KernelSpec, guest: &GuestJob) -> Result<GuestOutcome> {
    let tools = ensure_host_tools()?;
    let prepared = prepare_kernel(kernel)?;
    boot_prepared(&tools, &prepared, guest)
}

fn busybox_applets(busybox: &std::path::Path) -> Result<&'static str> {
    static APPLETS: OnceLock<String> = OnceLock::new();
    if let Some(a) = APPLETS.get() {
        return Ok(a);
    }
    let out = host::run_checked(std::process::Command::new(busybox).arg("--list-full"))
        .context("listing busybox applets (busybox --list-full)")?;
    Ok(APPLETS.get_or_init(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// [`boot`] for a kernel already in the cache.
pub fn boot_prepared(
    tools: &HostTools,
    kernel: &PreparedKernel,
    guest: &GuestJob,
) -> Result<GuestOutcome> {
    ensure!(
        guest.timeout > Duration::ZERO,
        "the VM timeout must be positive"
    );
    let tree = kernel
        .module_tree()
        .with_context(|| format!("reading the modules of {}", kernel.package))?;
    let plan = tree
        .plan(&guest.modules)
        .with_context(|| format!("resolving modules for kernel {}", kernel.name))?;
    for (m, why) in &plan.missing {
        say!("kernel {}: warning: module {m} skipped: {why}", kernel.name);
    }

    let mut env = vec![("VM_KERNEL".to_owned(), kernel.name.clone())];
    env.extend(guest.env.iter().cloned());
    let init = initramfs::init_script(&plan.load_order, &env);
    let mut t = initramfs::base_tree(&tools.busybox, busybox_applets(&tools.busybox)?, init)?;
    for m in &plan.load_order {
        let ko = tree
            .decompressed(m)
            .with_context(|| format!("preparing module {m} of {}", kernel.package))?;
        t.file(
            &format!("{}/{m}.ko", initramfs::GUEST_MODULE_DIR),
            0o644,
            Data::Host(ko),
        )?;
    }
    if let Some(bin) = &guest.binary {
        let is_static =
            elf::is_static(bin).with_context(|| format!("checking {}", bin.display()))?;
        ensure!(
            is_static,
            "{} is dynamically linked and cannot run in the VM's initramfs; build it static: \
             RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --target x86_64-unknown-linux-gnu",
            bin.display()
        );
        t.file(GUEST_BINARY, 0o755, Data::Host(bin.clone()))?;
    }
    for f in &guest.files {
        let data = match &f.source {
            FileSource::Host(p) => {
                ensure!(
                    p.is_file(),
                    "guest file {} does not exist on the host",
                    p.display()
                );
                Data::Host(p.clone())
            }
            FileSource::Bytes(b) => Data::Bytes(b.clone()),
        };
        t.file(&f.guest_path, f.mode, data)
            .with_context(|| format!("adding {} to the initramfs", f.guest_path))?;
    }
    t.file(
        initramfs::GUEST_JOB,
        0o755,
        Data::Bytes(guest.script.clone().into_bytes()),
    )?;

    let dir = qemu::run_dir(&kernel.name)?;
    let initrd = dir.join("initrd.gz");
    let size = t.write_gz(&initrd).context("writing the initramfs")?;
    say!(
        "kernel {}: booting {} with {} module(s), initramfs {:.1} MiB, timeout {} s",
        kernel.name,
        kernel.release,
        plan.load_order.len(),
        size as f64 / (1024.0 * 1024.0),
        guest.timeout.as_secs()
    );
    let mut cmdline = "console=ttyS0 quiet panic=-1 oops=panic rdinit=/init".to_owned();
    if !guest.extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&guest.extra_cmdline);
    }
    let console_log = dir.join("console.log");
    let result_path = dir.join("result.serial");
    let run = qemu::run(&qemu::QemuConfig {
        qemu: &tools.qemu,
        vmlinuz: &kernel.vmlinuz,
        initrd: &initrd,
        cmdline: &cmdline,
        memory_mib: guest.memory_mib,
        cpus: guest.cpus,
        console_log: &console_log,
        result_path: &result_path,
        timeout: guest.timeout,
        stream_console: guest.stream_console,
    })?;

    let failure = |what: String| -> anyhow::Error {
        let panic = if run.console.contains("Kernel panic") {
            " (the kernel panicked)"
        } else {
            ""
        };
        anyhow::anyhow!(
            "{what}{panic}; boot files kept in {} (console.log, result.serial, initrd.gz).\n\
             Last console lines:\n{}",
            dir.display(),
            qemu::tail(&run.console, 40)
        )
    };
    let Some(status) = run.status else {
        return Err(failure(format!(
            "VM with kernel {} did not finish within {} s and was killed (raise --timeout / GuestJob::timeout \
             if the job is just slow)",
            kernel.name,
            guest.timeout.as_secs()
        )));
    };
    let Some((result, exit_code)) = qemu::parse_result_channel(&run.result_channel) else {
        return Err(failure(format!(
            "VM with kernel {} exited ({status}) after {:.1} s without reporting the job's exit status",
            kernel.name,
            run.elapsed.as_secs_f64()
        )));
    };
    if std::env::var_os("TCP_TRACE_VM_KEEP").is_none() {
        let _ = fs::remove_dir_all(&dir);
    } else {
        say!(
            "kernel {}: boot files kept in {}",
            kernel.name,
            dir.display()
        );
    }
    Ok(GuestOutcome {
        kernel: kernel.name.clone(),
        package: kernel.package.clone(),
        release: kernel.release.clone(),
        exit_code,
        result,
        console: run.console,
        elapsed: run.elapsed,
        modules: ModuleReport {
            loaded: plan.load_order,
            builtin: plan.builtin,
            missing: plan.missing,
        },
    })
}

/// `cargo xtask vm-run`: boot catalogue kernels under qemu and run a command inside.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example: cargo xtask vm-run --kernel 6.12 --binary target/x86_64-unknown-linux-gnu/release/tcp-trace -- tcp-trace --help"
)]
pub struct VmRunArgs {
    /// Catalogue kernel to boot (see --list), or `all` for each in turn.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Statically linked executable to install as /bin/tcp-trace in the guest.
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Extra file for the guest, as HOST_PATH[:GUEST_PATH] (default guest path: /root/<name>).
    #[arg(long = "file", value_name = "HOST[:GUEST]")]
    files: Vec<String>,
    /// Per-boot wall-clock timeout in seconds (qemu runs without KVM here, so be generous).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    timeout: u64,
    /// Kernel modules to load in the guest (comma-separated); their dependencies come along.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_MODULES.iter().map(|m| m.to_string()))]
    modules: Vec<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Do not stream the guest console; show it only when something fails.
    #[arg(long)]
    quiet: bool,
    /// Print the kernel catalogue with what is cached, and exit.
    #[arg(long)]
    list: bool,
    /// Command and arguments to run in the guest (after `--`); default `uname -a`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

pub fn run(args: VmRunArgs) -> Result<()> {
    if args.list {
        return list();
    }
    let specs = kernels_for(&args.kernel)?;
    let command = if args.command.is_empty() {
        vec!["uname".to_owned(), "-a".to_owned()]
    } else {
        args.command.clone()
    };
    let mut job = GuestJob::command(&command);
    if let Some(bin) = &args.binary {
        job = job.with_binary(bin);
    }
    for spec in &args.files {
        job = job.with_file(parse_file_arg(spec)?);
    }
    job.timeout = Duration::from_secs(args.timeout);
    job.modules = args.modules.clone();
    job.memory_mib = args.memory;
    job.cpus = args.cpus;
    job.stream_console = !args.quiet;
    if let Some(bin) = &job.binary {
        ensure!(bin.is_file(), "--binary {} does not exist", bin.display());
    }

    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for spec in specs {
        match boot(spec, &job) {
            Ok(out) => {
                if args.quiet && !out.success() {
                    say!("kernel {}: last console lines:", out.kernel);
                    eprintln!("{}", out.console_tail(100));
                }
                let m = &out.modules;
                say!(
                    "kernel {} ({}): modules loaded: {}; built in: {}; skipped: {}",
                    out.kernel,
                    out.package,
                    list_or_none(&m.loaded),
                    list_or_none(&m.builtin),
                    list_or_none(&m.missing.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>())
                );
                if !out.result.is_empty() {
                    say!("kernel {}: result channel:", out.kernel);
                    print!("{}", out.result);
                }
                say!(
                    "kernel {} ({}): guest command exited with {} after {:.1} s",
                    out.kernel,
                    out.release,
                    out.exit_code,
                    out.elapsed.as_secs_f64()
                );
                summary.push(format!(
                    "{} ({}): exit {} in {:.1} s",
                    out.kernel,
                    out.release,
                    out.exit_code,
                    out.elapsed.as_secs_f64()
                ));
                if !out.success() {
                    failures.push(format!("{}: exit {}", out.kernel, out.exit_code));
                }
            }
            Err(e) => {
                say!("kernel {}: FAILED: {e:#}", spec.name);
                summary.push(format!("{}: failed to run", spec.name));
                failures.push(format!(
                    "{}: {}",
                    spec.name,
                    e.to_string().lines().next().unwrap_or_default()
                ));
            }
        }
    }
    if summary.len() > 1 {
        for s in &summary {
            say!("summary: {s}");
        }
    }
    if !failures.is_empty() {
        bail!("the guest command failed on {}", failures.join("; "));
    }
    Ok(())
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(" ")
    }
}

fn parse_file_arg(spec: &str) -> Result<GuestFile> {
    let (host, guest) = match spec.rsplit_once(':') {
        Some((h, g)) if g.starts_with('/') => (h, g.to_owned()),
        _ => {
            let name = std::path::Path::new(spec)
                .file_name()
                .context("--file needs a file path")?;
            (spec, format!("/root/{}", name.to_string_lossy()))
        }
    };
    ensure!(
        std::path::Path::new(host).is_file(),
        "--file {host}: no such file on the host"
    );
    Ok(GuestFile::host(host, guest))
}

fn list() -> Result<()> {
    println!(
        "{:<6} {:<40} {:<45} cached",
        "kernel", "package pattern", "newest apt offers"
    );
    for spec in KERNELS {
        let newest = match newest_available(spec) {
            Ok(Some((pkg, ver))) => format!("{pkg} {ver}"),
            Ok(None) => "(none)".to_owned(),
            Err(e) => format!(
                "(apt: {})",
                e.to_string().lines().next().unwrap_or_default()
            ),
        };
        let cached = cached_kernels(spec)?;
        let cached = if cached.is_empty() {
            "(none)".to_owned()
        } else {
            cached
                .iter()
                .map(|k| format!("{} [{}]", k.package, k.release))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<6} {:<40} {:<45} {}",
            spec.name,
            spec.package_globs.join(" "),
            newest,
            cached
        );
    }
    println!("cache: {}", host::kernels_dir()?.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_jobs_quote_arguments() {
        let job = GuestJob::command(&["sh", "-c", "echo 'hi' && uname -r"]);
        assert_eq!(job.script, "sh -c 'echo '\\''hi'\\'' && uname -r'\n");
        assert_eq!(job.modules, DEFAULT_MODULES);
        assert_eq!(job.timeout, Duration::from_secs(300));
    }

    #[test]
    fn file_args() {
        let f = parse_file_arg("/bin/sh:/usr/local/bin/x").unwrap();
        assert_eq!(f.guest_path, "/usr/local/bin/x");
        let f = parse_file_arg("/bin/sh").unwrap();
        assert_eq!(f.guest_path, "/root/sh");
        assert!(parse_file_arg("/does/not/exist").is_err());
    }
}
