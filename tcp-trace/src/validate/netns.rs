//! Private network namespaces for `validate`: anonymous (never bind-mounted under /run/netns), so
//! they vanish with the last file descriptor when tcp-trace exits, however it exits. Code runs
//! inside one on a thread of its own (namespaces are per thread), and a veth pair links two.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    thread,
};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::TryStreamExt;
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, packet_route::link::InfoData};

/// One network namespace, alive while this value is.
pub struct Netns {
    fd: OwnedFd,
    /// The namespace's inode: what the eBPF programs report as `netns`.
    pub inode: u32,
}

fn enter(fd: &OwnedFd) -> Result<()> {
    // SAFETY: setns on a namespace fd we own; affects only the calling thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Netns {
    /// A new namespace with its loopback up.
    pub fn new() -> Result<Netns> {
        let fd = thread::spawn(|| -> Result<OwnedFd> {
            // SAFETY: unshare affects only this (short-lived) thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "cannot create a network namespace ({}): validate needs root \
                     (CAP_SYS_ADMIN)",
                    std::io::Error::last_os_error()
                );
            }
            let f = File::open("/proc/thread-self/ns/net").context("open own netns")?;
            Ok(OwnedFd::from(f))
        })
        .join()
        .map_err(|_| anyhow!("netns thread panicked"))??;
        let inode = File::from(fd.try_clone()?).metadata()?.ino() as u32;
        let ns = Netns { fd, inode };
        ns.netlink(|h| async move { set_up(&h, "lo").await })?;
        Ok(ns)
    }

    /// Runs `f` on a thread inside this namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        thread::scope(|s| {
            s.spawn(|| {
                enter(&self.fd)?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("thread in netns panicked"))?
        })
    }

    /// Starts `f` on a thread inside this namespace.
    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<thread::JoinHandle<Result<T>>> {
        let fd = self.fd.try_clone()?;
        Ok(thread::spawn(move || {
            enter(&fd)?;
            f()
        }))
    }

    /// Sets a sysctl of this namespace, e.g. `net.ipv4.tcp_fin_timeout`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.run(move || {
            std::fs::write(&path, &value).with_context(|| format!("sysctl {path} = {value}"))
        })
    }

    pub(crate) fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(move || {
            Ok(std::fs::read_to_string(&path)
                .with_context(|| format!("read {path}"))?
                .trim()
                .to_string())
        })
    }

    /// Runs rtnetlink requests inside this namespace.
    fn netlink<F, Fut>(&self, f: F) -> Result<()>
    where
        F: FnOnce(rtnetlink::Handle) -> Fut + Send,
        Fut: std::future::Future<Output = Result<()>>,
    {
        self.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (conn, handle, _) =
                    rtnetlink::new_connection().context("open a netlink socket")?;
                let task = tokio::spawn(conn);
                let r = f(handle).await;
                task.abort();
                r
            })
        })
    }
}

async fn index_of(h: &rtnetlink::Handle, name: &str) -> Result<u32> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    let link = links
        .try_next()
        .await
        .with_context(|| format!("look up link {name}"))?
        .ok_or_else(|| anyhow!("no link named {name}"))?;
    Ok(link.header.index)
}

async fn set_up(h: &rtnetlink::Handle, name: &str) -> Result<()> {
    let index = index_of(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("set {name} up"))
}

async fn add_addr(h: &rtnetlink::Handle, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    let index = index_of(h, name).await?;
    h.address()
        .add(index, addr.into(), prefix)
        .execute()
        .await
        .with_context(|| format!("add {addr}/{prefix} to {name}"))
}

/// Links `a` and `b` with a veth pair named `name_a` (in a) and `name_b` (in b), addressed
/// `addr_a`/`addr_b` in a /24, both up.
pub(crate) fn veth_pair(
    a: &Netns,
    b: &Netns,
    (name_a, addr_a): (&str, Ipv4Addr),
    (name_b, addr_b): (&str, Ipv4Addr),
) -> Result<()> {
    let peer_fd = b.fd.as_raw_fd();
    let (na, nb) = (name_a.to_string(), name_b.to_string());
    a.netlink(|h| async move {
        // The peer is created directly in b.
        let peer = LinkMessageBuilder::<LinkUnspec>::default()
            .name(nb.clone())
            .setns_by_fd(peer_fd)
            .build();
        let msg = LinkVeth::new(&na, &nb)
            .set_info_data(InfoData::Veth(
                rtnetlink::packet_route::link::InfoVeth::Peer(peer),
            ))
            .build();
        h.link()
            .add(msg)
            .execute()
            .await
            .context("create a veth pair (needs CONFIG_VETH; on module kernels `modprobe veth`)")?;
        add_addr(&h, &na, addr_a, 24).await?;
        set_up(&h, &na).await
    })?;
    let nb = name_b.to_string();
    b.netlink(|h| async move {
        add_addr(&h, &nb, addr_b, 24).await?;
        set_up(&h, &nb).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn namespaces_are_private_and_linked_by_veth() {
        if !root() {
            eprintln!("skipped: creating namespaces needs root");
            return;
        }
        let a = Netns::new().unwrap();
        let b = Netns::new().unwrap();
        assert_ne!(a.inode, b.inode);
        a.sysctl("net.ipv4.tcp_fin_timeout", "7").unwrap();
        assert_eq!(a.read_sysctl("net.ipv4.tcp_fin_timeout").unwrap(), "7");
        assert_ne!(b.read_sysctl("net.ipv4.tcp_fin_timeout").unwrap(), "7");
        veth_pair(
            &a,
            &b,
            ("tta", Ipv4Addr::new(10, 9, 0, 1)),
            ("ttb", Ipv4Addr::new(10, 9, 0, 2)),
        )
        .unwrap();
        let listener = b
            .run(|| Ok(std::net::TcpListener::bind("10.9.0.2:7000")?))
            .unwrap();
        let got = a
            .run(|| {
                let s = std::net::TcpStream::connect("10.9.0.2:7000")?;
                Ok(s.peer_addr()?)
            })
            .unwrap();
        assert_eq!(got.to_string(), "10.9.0.2:7000");
        drop(listener);
    }
}
