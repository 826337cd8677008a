//! Where the live trace's stream goes: stdout, a file (`--output FILE`, reopened on SIGHUP so
//! that logrotate can move it away), or nowhere (`--quiet`).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

pub(crate) enum Output {
    Stdout(BufWriter<io::Stdout>),
    File { path: PathBuf, out: BufWriter<File> },
    Quiet,
}

fn open_append(path: &Path) -> Result<BufWriter<File>> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("--output {}: cannot open it for writing", path.display()))?;
    Ok(BufWriter::new(file))
}

impl Output {
    pub(crate) fn stdout() -> Self {
        Output::Stdout(BufWriter::new(io::stdout()))
    }

    /// Appends to `path` (created if missing): a restarted daemon does not wipe its log.
    pub(crate) fn file(path: &Path) -> Result<Self> {
        Ok(Output::File {
            path: path.to_path_buf(),
            out: open_append(path)?,
        })
    }

    /// logrotate's convention: after it renamed the file, SIGHUP makes us flush what we have
    /// to the old one and carry on in a new file at the same path.
    pub(crate) fn reopen(&mut self) -> Result<()> {
        if let Output::File { path, out } = self {
            out.flush()
                .with_context(|| format!("flushing {}", path.display()))?;
            *out = open_append(path)?;
        }
        Ok(())
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Stdout(w) => w.write(buf),
            Output::File { out, .. } => out.write(buf),
            Output::Quiet => Ok(buf.len()),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.write_all(buf),
            Output::File { out, .. } => out.write_all(buf),
            Output::Quiet => Ok(()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.flush(),
            Output::File { out, .. } => out.flush(),
            Output::Quiet => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_starts_a_new_file_after_a_rename() {
        let dir = std::env::temp_dir().join(format!("tcp-trace-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.json");
        let rotated = dir.join("trace.json.1");
        let mut out = Output::file(&path).unwrap();
        writeln!(out, "first").unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        writeln!(out, "still first").unwrap();
        out.reopen().unwrap();
        writeln!(out, "second").unwrap();
        out.flush().unwrap();
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap(),
            "first\nstill first\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_path_names_the_flag() {
        let e = Output::file(Path::new("/nonexistent-dir/x.json"))
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("--output /nonexistent-dir/x.json"),
            "{e:#}"
        );
    }
}
