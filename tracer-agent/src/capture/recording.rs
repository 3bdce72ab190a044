//! Event recordings: the raw ring-buffer records of a session, as the kernel wrote
//! them, so that the whole pipeline can be replayed from them without root
//! (`tracer-agent --record-events FILE`; the replay test in `tests/replay.rs`).
//!
//! Format: the line `tracer-events 1\n`, then the clock offset (boot time to Unix
//! time, nanoseconds, `i64` little endian), then one record after another, each a
//! `u32` little-endian length and that many bytes. A recording holds the captured
//! payload prefixes as they were: keep it as private as the traffic itself.

use std::io::Write;

use super::{
    Clock,
    reader::{RecordSource, RecordedRecords},
};

/// The first line of every recording.
const MAGIC: &[u8] = b"tracer-events 1\n";

/// A recording that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordingError {
    #[error("not an event recording (it does not start with \"tracer-events 1\")")]
    NotARecording,
    #[error("the recording ends inside a record header or record, at byte {0}")]
    Truncated(usize),
}

/// Writes records as they are read.
pub struct RecordingWriter<W: Write> {
    out: W,
    /// Write failures (the recording stops at the first one; capture goes on).
    failed: bool,
}

impl<W: Write> RecordingWriter<W> {
    /// Starts a recording: writes the header for `clock`.
    pub fn new(mut out: W, clock: &Clock) -> std::io::Result<Self> {
        out.write_all(MAGIC)?;
        let offset = i64::try_from(clock.offset_ns()).unwrap_or(i64::MAX);
        out.write_all(&offset.to_le_bytes())?;
        Ok(Self { out, failed: false })
    }

    /// Appends one raw record.
    pub fn record(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let wrote = self
            .out
            .write_all(&len.to_le_bytes())
            .and_then(|()| self.out.write_all(&bytes[..len as usize]));
        if let Err(e) = wrote {
            log::warn!("event recording stopped: {e}");
            self.failed = true;
        }
    }

    pub fn flush(&mut self) {
        if !self.failed
            && let Err(e) = self.out.flush()
        {
            log::warn!("event recording stopped: {e}");
            self.failed = true;
        }
    }
}

/// A source whose records are also written to a recording.
pub struct Tee<'a, S: RecordSource, W: Write> {
    pub source: &'a mut S,
    pub recording: Option<&'a mut RecordingWriter<W>>,
}

impl<S: RecordSource, W: Write> RecordSource for Tee<'_, S, W> {
    type Record<'b>
        = S::Record<'b>
    where
        Self: 'b;

    fn next_record(&mut self) -> Option<Self::Record<'_>> {
        let record = self.source.next_record()?;
        if let Some(r) = self.recording.as_deref_mut() {
            r.record(&record);
        }
        Some(record)
    }
}

/// Reads a recording: the clock it was made with and its records, in order.
pub fn read(bytes: &[u8]) -> Result<(Clock, RecordedRecords), RecordingError> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or(RecordingError::NotARecording)?;
    let (offset, mut rest) = rest
        .split_first_chunk::<8>()
        .ok_or(RecordingError::Truncated(MAGIC.len()))?;
    let clock = Clock::with_offset(i128::from(i64::from_le_bytes(*offset)));
    let mut records = Vec::new();
    while !rest.is_empty() {
        let at = bytes.len() - rest.len();
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or(RecordingError::Truncated(at))?;
        let len = u32::from_le_bytes(*len) as usize;
        let record = tail.get(..len).ok_or(RecordingError::Truncated(at))?;
        records.push(record.to_vec());
        rest = &tail[len..];
    }
    Ok((clock, RecordedRecords::new(records)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_reads_back_as_written() {
        let clock = Clock::with_offset(1_700_000_000_000_000_000);
        let mut w = RecordingWriter::new(Vec::new(), &clock).unwrap();
        let mut source = RecordedRecords::new([b"one".to_vec(), Vec::new(), b"three".to_vec()]);
        let mut tee = Tee {
            source: &mut source,
            recording: Some(&mut w),
        };
        let mut seen = Vec::new();
        while let Some(r) = tee.next_record() {
            seen.push(r.to_vec());
        }
        w.flush();
        let (back, mut records) = read(&w.out).unwrap();
        assert_eq!(back.to_unix_ns(5), clock.to_unix_ns(5));
        let mut again = Vec::new();
        while let Some(r) = records.next_record() {
            again.push(r.to_vec());
        }
        assert_eq!(again, seen);
        assert_eq!(again, [b"one".to_vec(), Vec::new(), b"three".to_vec()]);
    }

    #[test]
    fn bad_recordings_are_clear_errors() {
        assert_eq!(
            read(b"GET / HTTP/1.1").err(),
            Some(RecordingError::NotARecording)
        );
        let mut w = RecordingWriter::new(Vec::new(), &Clock::with_offset(0)).unwrap();
        w.record(b"abcdef");
        let cut = &w.out[..w.out.len() - 2];
        assert_eq!(read(cut).err(), Some(RecordingError::Truncated(24)));
        assert_eq!(
            read(&w.out[..20]).err(),
            Some(RecordingError::Truncated(16))
        );
    }
}
