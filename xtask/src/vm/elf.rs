//! Just enough ELF64 little-endian reading for the VM runner: whether an executable is static
//! (no `PT_INTERP`), and a kernel module's `.modinfo` strings.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

const PT_INTERP: u32 = 3;

fn check_ident(ident: &[u8]) -> Result<()> {
    ensure!(
        ident.len() >= 16 && &ident[..4] == b"\x7fELF",
        "not an ELF file"
    );
    ensure!(
        ident[4] == 2 && ident[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    Ok(())
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Whether the ELF executable at `path` runs without a dynamic loader (static or static-pie).
pub fn is_static(path: &Path) -> Result<bool> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0)
        .with_context(|| format!("{} is too short for ELF", path.display()))?;
    check_ident(&eh).with_context(|| path.display().to_string())?;
    let phoff = u64_at(&eh, 0x20);
    let phentsize = u64::from(u16_at(&eh, 0x36));
    let phnum = u64::from(u16_at(&eh, 0x38));
    ensure!(
        phentsize >= 4,
        "{}: bad program header size",
        path.display()
    );
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    f.read_exact_at(&mut ph, phoff)
        .with_context(|| format!("{}: truncated program headers", path.display()))?;
    Ok(!ph
        .chunks(phentsize as usize)
        .any(|h| u32_at(h, 0) == PT_INTERP))
}

/// The contents of the section called `name` in the ELF image `elf`, if it has one.
pub fn section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    check_ident(elf)?;
    ensure!(elf.len() >= 64, "truncated ELF header");
    let shoff = u64_at(elf, 0x28) as usize;
    let shentsize = usize::from(u16_at(elf, 0x3a));
    let shnum = usize::from(u16_at(elf, 0x3c));
    let shstrndx = usize::from(u16_at(elf, 0x3e));
    ensure!(shentsize >= 40, "bad section header size {shentsize}");
    let header = |i: usize| -> Result<&[u8]> {
        let start = shoff + i * shentsize;
        elf.get(start..start + shentsize)
            .context("section header out of bounds")
    };
    let body = |h: &[u8]| -> Result<&'a [u8]> {
        let (off, size) = (u64_at(h, 24) as usize, u64_at(h, 32) as usize);
        elf.get(off..off + size).context("section out of bounds")
    };
    if shstrndx >= shnum {
        bail!("no section name table");
    }
    let names = body(header(shstrndx)?)?;
    for i in 0..shnum {
        let h = header(i)?;
        let name_off = u32_at(h, 0) as usize;
        let Some(rest) = names.get(name_off..) else {
            continue;
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            return body(h).map(Some);
        }
    }
    Ok(None)
}

/// What a kernel module's `.modinfo` says it needs: `depends=` (modules that export symbols it
/// uses) and the `pre:` part of `softdep=` (modules or aliases to load first if available, e.g.
/// `crc32c` for libcrc32c, which cannot initialise without a crc32c implementation).
pub fn module_deps(ko: &[u8]) -> Result<super::modules::ModDeps> {
    let Some(info) = section(ko, ".modinfo")? else {
        bail!("no .modinfo section: not a kernel module");
    };
    let mut deps = super::modules::ModDeps::default();
    for entry in info.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        if let Some(list) = entry.strip_prefix("depends=") {
            deps.hard.extend(
                list.split(',')
                    .filter(|d| !d.is_empty())
                    .map(super::modules::normalize),
            );
        } else if let Some(spec) = entry.strip_prefix("softdep=") {
            let mut in_pre = false;
            for word in spec.split_whitespace() {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    m if in_pre => deps.soft_pre.push(super::modules::normalize(m)),
                    _ => {}
                }
            }
        }
    }
    Ok(deps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with sections: null, .shstrtab, .modinfo.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let shstr_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstrtab.len());
        sh(11, modinfo_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_modinfo_depends() {
        let m = fake_module(b"license=GPL\0depends=nf_conntrack,nf-tables\0name=nft_ct\0");
        let d = module_deps(&m).unwrap();
        assert_eq!(d.hard, ["nf_conntrack", "nf_tables"]);
        assert!(d.soft_pre.is_empty());
        let m = fake_module(b"depends=\0name=veth\0");
        assert!(module_deps(&m).unwrap().hard.is_empty());
        let m = fake_module(b"softdep=pre: crc32c post: foo\0depends=\0name=libcrc32c\0");
        assert_eq!(module_deps(&m).unwrap().soft_pre, ["crc32c"]);
        assert!(
            module_deps(b"not elf at all, not elf at all, not elf at all, not elf at all!!")
                .is_err()
        );
    }

    #[test]
    fn static_check_on_host_binaries() {
        // /bin/sh on Debian is dynamically linked; the check must say so.
        if Path::new("/bin/sh").exists() {
            assert!(!is_static(Path::new("/bin/sh")).unwrap());
        }
    }
}
