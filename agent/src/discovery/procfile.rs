//! A `/proc` file kept open and read again from its start. Discovery reads `/proc/net/igmp`
//! and `/proc/net/route` on every tick (every 5 s, idle or not); opening a procfs path (path
//! walk, `statx`, `close`) cost more than reading it, and it was a good part of what an idle
//! agent spends. procfs regenerates a seq file's text on a read from offset 0.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

pub struct ProcFile {
    path: &'static str,
    file: Option<File>,
    buf: Vec<u8>,
}

impl ProcFile {
    pub fn new(path: &'static str) -> ProcFile {
        ProcFile {
            path,
            file: None,
            buf: Vec::new(),
        }
    }

    /// The file's text now; `None` if it cannot be opened or read (it is opened again on the
    /// next call).
    pub fn read(&mut self) -> Option<&str> {
        if self.fill().is_err() {
            self.file = None;
            return None;
        }
        std::str::from_utf8(&self.buf).ok()
    }

    fn fill(&mut self) -> std::io::Result<()> {
        self.buf.clear();
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(File::open(self.path)?),
        };
        file.seek(SeekFrom::Start(0))?;
        let mut chunk = [0u8; 4096];
        loop {
            let n = file.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_same_proc_file_again_from_its_start() {
        let mut f = ProcFile::new("/proc/self/stat");
        let first = f.read().map(str::to_owned).expect("readable");
        let again = f.read().expect("readable again");
        // The same process: the pid and name lead both readings.
        let head = |s: &str| s.split(')').next().map(str::to_owned);
        assert_eq!(head(&first), head(again));
        assert!(ProcFile::new("/proc/no-such-file").read().is_none());
    }
}
