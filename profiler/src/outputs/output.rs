//! Writing window records so that a full disk loses nothing: lines that could not be written
//! are kept in memory and retried with the next window, byte-exactly after a partial write.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// Creates (or truncates) an output file readable by its owner and group only: records and
/// charts name the host's VMs.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(path)
}

use crate::{note::Note, record::WindowRecord};

/// A JSON-lines sink that keeps what it could not write.
pub struct RecordSink<W: Write> {
    out: W,
    /// Serialized lines not yet written (a prefix of the first may already be on disk).
    pending: Vec<u8>,
    /// The last write error, while writes fail.
    failing: Option<io::ErrorKind>,
}

impl<W: Write> RecordSink<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            pending: Vec::new(),
            failing: None,
        }
    }

    /// Queues `records` and writes everything pending. `Ok`: all written; `Err`: some bytes
    /// are still pending (kept for the next call).
    pub fn push(&mut self, records: &[WindowRecord]) -> io::Result<()> {
        for r in records {
            self.pending.extend_from_slice(r.to_json_line().as_bytes());
            self.pending.push(b'\n');
        }
        self.drain()
    }

    /// Writes what is pending; on error, drops only the bytes that reached the writer.
    pub fn drain(&mut self) -> io::Result<()> {
        let mut written = 0;
        let result = loop {
            if written == self.pending.len() {
                break self.out.flush();
            }
            match self.out.write(&self.pending[written..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.pending.drain(..written);
        self.failing = result.as_ref().err().map(|e| e.kind());
        result
    }

    /// Whether the last write failed (to warn once per failure streak).
    pub fn is_failing(&self) -> bool {
        self.failing.is_some()
    }

    /// Whether the reader went away (a closed pipe): nothing written later can arrive.
    pub fn is_closed(&self) -> bool {
        self.failing == Some(io::ErrorKind::BrokenPipe)
    }

    /// Bytes not yet written.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Puts bytes another sink could not write in front of this one's (a reopened file takes
    /// what the old one could not).
    pub fn requeue(&mut self, mut bytes: Vec<u8>) {
        bytes.append(&mut self.pending);
        self.pending = bytes;
    }

    /// [`Self::push`], with what changed said as a note: when writing starts failing (once
    /// per failure streak) and when it works again.
    pub fn write(&mut self, records: &[WindowRecord]) -> Option<Note> {
        let was_failing = self.is_failing();
        match self.push(records) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Some(Note::general(
                "the output was closed (broken pipe): stopping",
            )),
            Err(e) if !was_failing => Some(Note::general(format!(
                "cannot write window records ({e}); keeping them in memory and retrying every \
                 window"
            ))),
            Ok(()) if was_failing => Some(Note::general(
                "writing window records again; nothing was lost",
            )),
            _ => None,
        }
    }

    /// Last attempt at exit. `Err` holds what still could not be written, for the command to
    /// print somewhere rather than lose.
    pub fn finish(&mut self) -> Result<(), Vec<u8>> {
        match self.drain() {
            Ok(()) => Ok(()),
            Err(_) => Err(std::mem::take(&mut self.pending)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `capacity` bytes, then fails like a full disk until `free` is called.
    struct FullDisk {
        data: Vec<u8>,
        capacity: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = self.capacity - self.data.len();
            if room == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = room.min(buf.len());
            self.data.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn records(n: u64) -> Vec<WindowRecord> {
        (0..n)
            .map(|w| {
                let mut r = crate::record::tests::sample();
                r.window = w;
                r
            })
            .collect()
    }

    #[test]
    fn full_disk_loses_nothing() {
        let all = records(3);
        let line_len = all[0].to_json_line().len() + 1;
        let mut sink = RecordSink::new(FullDisk {
            data: Vec::new(),
            capacity: line_len + 10,
        });
        // One line and a bit fit; the rest stays pending.
        assert!(sink.push(&all[..2]).is_err());
        assert!(sink.is_failing());
        assert_eq!(sink.pending().len(), line_len - 10);
        assert!(sink.push(&all[2..]).is_err());
        // Space frees up: the next write completes everything, byte-exactly.
        sink.out.capacity = usize::MAX / 2;
        sink.drain().unwrap();
        assert!(!sink.is_failing());
        let text = String::from_utf8(sink.out.data.clone()).unwrap();
        let (read, warnings) = crate::record::read_records(text.as_bytes()).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(read, all);
    }
}
