//! What a fleet installs (`cargo xtask dist`): the DaemonSet manifest against the Kubernetes
//! schemas (kubernetes-validate, from PyPI), and the .deb installed with dpkg on this machine,
//! then `tcp-trace doctor` and the metrics daemon (as its systemd unit starts it) run from it.
//!
//! `cargo xtask test` builds the package and passes it as TCP_TRACE_DEB, the validator as
//! TCP_TRACE_K8S_VALIDATE. They are #[ignore]d unless run with --include-ignored (as `cargo xtask
//! test` does); asked to run without them, or without root for dpkg, they fail.

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

mod common;

use common::net::http_get;

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/daemonset.yaml");

fn validator() -> Option<PathBuf> {
    std::env::var_os("TCP_TRACE_K8S_VALIDATE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/tcp-trace/venv-k8s/bin/kubernetes-validate"))
        })
        .filter(|p| p.is_file())
}

fn validate(bin: &Path, file: &Path) -> (bool, String) {
    let out = Command::new(bin)
        .arg("--strict")
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
#[ignore = "needs TCP_TRACE_K8S_VALIDATE: run with --include-ignored, as `cargo xtask test` does"]
fn daemonset_manifest_passes_the_kubernetes_schemas() {
    let Some(bin) = validator() else {
        common::skip("kubernetes-validate is not installed (`cargo xtask setup-tests`)");
        return;
    };
    let (ok, said) = validate(&bin, Path::new(MANIFEST));
    assert!(ok, "the DaemonSet manifest does not validate:\n{said}");
    let text = std::fs::read_to_string(MANIFEST).unwrap();
    for must in [
        "kind: DaemonSet",
        "hostPID: true",
        "containerPort: 9464",
        "\"BPF\", \"PERFMON\"",
        "--metrics",
    ] {
        assert!(text.contains(must), "the manifest lacks `{must}`");
    }
    // The validator does catch mistakes: a misspelt field fails the strict check.
    let bad = std::env::temp_dir().join(format!("tcp-trace-bad-{}.yaml", std::process::id()));
    std::fs::write(&bad, text.replace("hostPID: true", "hostPid: true")).unwrap();
    let (ok, said) = validate(&bin, &bad);
    let _ = std::fs::remove_file(&bad);
    assert!(!ok, "a misspelt field passed validation:\n{said}");
}

/// dpkg, waiting (up to 5 min) while another dpkg or apt on the machine holds its lock.
fn dpkg(args: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let out = Command::new("dpkg").args(args).output().expect("run dpkg");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return text;
        }
        if !text.contains("lock") || start.elapsed() > Duration::from_secs(300) {
            panic!("dpkg {args:?} failed:\n{text}");
        }
        thread::sleep(Duration::from_secs(2));
    }
}

/// Purges the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "tcp-trace"])
            .stdout(Stdio::null())
            .status();
    }
}

/// The unit's ExecStart with its environment expanded as systemd would (Environment= lines,
/// then the EnvironmentFile overriding them; `${X}` as one word, `$X` split on spaces).
fn exec_start(unit: &str, env_file: &str) -> Vec<String> {
    let mut env = std::collections::BTreeMap::new();
    for l in unit.lines() {
        if let Some(kv) = l.strip_prefix("Environment=")
            && let Some((k, v)) = kv.split_once('=')
        {
            env.insert(k.to_string(), v.to_string());
        }
    }
    for l in env_file
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        if let Some((k, v)) = l.split_once('=') {
            env.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
    }
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            argv.push(env.get(name).cloned().unwrap_or_default());
        } else if let Some(name) = word.strip_prefix('$') {
            argv.extend(
                env.get(name)
                    .map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
                    .unwrap_or_default(),
            );
        } else {
            argv.push(word.to_string());
        }
    }
    argv
}

#[test]
#[ignore = "needs root and TCP_TRACE_DEB: run with --include-ignored as root, as `cargo xtask test` does"]
fn the_deb_installs_and_its_daemon_serves_metrics() {
    let Some(deb) = std::env::var_os("TCP_TRACE_DEB").map(PathBuf::from) else {
        common::skip("TCP_TRACE_DEB is not set: `cargo xtask test` builds the package first");
        return;
    };
    if !common::root_for("install a package with dpkg") {
        return;
    }
    let info = dpkg(&["--info", deb.to_str().unwrap()]);
    assert!(info.contains("Package: tcp-trace"), "{info}");
    dpkg(&["--install", deb.to_str().unwrap()]);
    let _installed = Installed;
    let files = dpkg(&["--listfiles", "tcp-trace"]);
    for must in [
        "/usr/bin/tcp-trace",
        "/usr/share/man/man1/tcp-trace.1",
        "/usr/share/man/man1/tcp-trace-resets.1",
        "/usr/share/bash-completion/completions/tcp-trace",
        "/usr/share/zsh/vendor-completions/_tcp-trace",
        "/usr/share/fish/vendor_completions.d/tcp-trace.fish",
        "tcp-trace.service",
        "/etc/default/tcp-trace",
        "/usr/share/doc/tcp-trace/examples/daemonset.yaml",
    ] {
        assert!(files.contains(must), "the package lacks {must}:\n{files}");
    }
    // Static: it runs on any distribution and in a FROM scratch image.
    let ldd = Command::new("ldd")
        .arg("/usr/bin/tcp-trace")
        .output()
        .unwrap();
    let ldd =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "{ldd}"
    );

    let doctor = Command::new("/usr/bin/tcp-trace")
        .arg("doctor")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&doctor.stdout).to_string();
    assert!(
        doctor.status.success(),
        "tcp-trace doctor failed: {doctor:?}"
    );
    assert!(said.contains("inet_sock_set_state"), "{said}");

    // The daemon, as the unit starts it, with the metrics on a port free here.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let unit_path = files
        .lines()
        .find(|l| l.ends_with("/tcp-trace.service"))
        .unwrap()
        .to_string();
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let defaults = std::fs::read_to_string("/etc/default/tcp-trace")
        .unwrap()
        .replace(
            "TCP_TRACE_METRICS=127.0.0.1:9464",
            &format!("TCP_TRACE_METRICS={addr}"),
        );
    std::fs::write("/etc/default/tcp-trace", &defaults).unwrap();
    let argv = exec_start(&unit, &defaults);
    assert_eq!(argv[0], "/usr/bin/tcp-trace", "{argv:?}");
    assert!(argv.contains(&"--quiet".to_string()), "{argv:?}");
    let mut daemon = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let start = Instant::now();
    let body = loop {
        match http_get(addr, "/metrics") {
            Ok((200, body)) if body.contains("tcp_trace_hook_attached") => break body,
            _ if start.elapsed() > Duration::from_secs(60) => {
                unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
                let _ = daemon.wait();
                panic!("the installed daemon served no metrics at {addr} within 60 s");
            }
            _ => thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(
        body.contains("tcp_trace_hook_attached{hook=\"inet_sock_set_state\"} 1"),
        "{body}"
    );
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    // 3: events were lost at some point (the unit's SuccessExitStatus=3 accepts it too).
    assert!(
        matches!(status.code(), Some(0 | 3)),
        "the daemon exited with {status}"
    );
    let mut printed = String::new();
    daemon
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    assert_eq!(printed, "", "the quiet daemon printed to stdout");
}
