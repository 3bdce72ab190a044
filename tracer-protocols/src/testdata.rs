//! The one format of the recorded connections in `testdata/` (the `.cap` files), and
//! its reader and writer. The format is described in `testdata/README.md`.
//!
//! A capture is one TCP connection, both directions, one record per socket read the
//! recording proxy made, in the order the proxy saw them:
//!
//! ```text
//! # comment lines (UTF-8), anywhere between records
//! c <ns since the recording started> <length>\n<length bytes>\n    client -> server
//! s <ns since the recording started> <length>\n<length bytes>\n    server -> client
//! ```
//!
//! Records are length-prefixed, so any bytes (binary protocols, CRLFs, NULs) are safe;
//! the newline after each record only keeps text captures readable. Timestamps never
//! decrease from one record to the next.
//!
//! Nothing here is on the agent's path: it is for tests, benchmarks and fuzz seeds.
//! The reader never panics: a malformed file is a [`CaptureError`].

use crate::Chunk;

/// One recorded socket read: which peer sent the bytes, when, and the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Sent by the client (`c`), else by the server (`s`).
    pub from_client: bool,
    /// Nanoseconds since the recording started.
    pub ts_ns: u64,
    pub bytes: &'a [u8],
}

impl<'a> Record<'a> {
    /// The record as one fully captured chunk.
    pub fn chunk(&self) -> Chunk<'a> {
        Chunk::whole(self.bytes, self.ts_ns)
    }
}

/// A parsed capture file; records borrow from the file's bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capture<'a> {
    /// The comment lines, without their `#` and the one space after it.
    pub comments: Vec<&'a str>,
    pub records: Vec<Record<'a>>,
}

impl Capture<'_> {
    /// Everything one peer sent, in order: the client's (`from_client`) or the
    /// server's byte stream.
    pub fn stream(&self, from_client: bool) -> Vec<u8> {
        self.records
            .iter()
            .filter(|r| r.from_client == from_client)
            .flat_map(|r| r.bytes.iter().copied())
            .collect()
    }
}

/// Why a capture file could not be read.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("capture byte {offset}: {what}")]
pub struct CaptureError {
    /// Where in the file the problem starts.
    pub offset: usize,
    pub what: &'static str,
}

/// Reads a capture file.
pub fn parse(file: &[u8]) -> Result<Capture<'_>, CaptureError> {
    let mut capture = Capture::default();
    let mut at = 0usize;
    let mut last_ts = 0u64;
    while at < file.len() {
        let err = |what| CaptureError { offset: at, what };
        let rest = file.get(at..).unwrap_or_default();
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(err("line without a newline"))?;
        let line = rest.get(..nl).unwrap_or_default();
        let body = at + nl + 1;
        if let Some(comment) = line.strip_prefix(b"#") {
            let comment = comment.strip_prefix(b" ").unwrap_or(comment);
            let comment = std::str::from_utf8(comment).map_err(|_| err("comment not UTF-8"))?;
            capture.comments.push(comment);
            at = body;
            continue;
        }
        let mut fields = line.split(|&b| b == b' ');
        let from_client = match fields.next() {
            Some(b"c") => true,
            Some(b"s") => false,
            _ => return Err(err("record does not start with `c ` or `s `")),
        };
        let ts_ns: u64 = decimal(fields.next()).ok_or(err("bad timestamp"))?;
        let len: usize = decimal(fields.next()).ok_or(err("bad length"))?;
        if fields.next().is_some() {
            return Err(err("more than three fields in a record header"));
        }
        if ts_ns < last_ts {
            return Err(err("timestamp earlier than the record before"));
        }
        last_ts = ts_ns;
        let end = body
            .checked_add(len)
            .filter(|&end| end < file.len())
            .ok_or(err("record runs past the end of the file"))?;
        if file.get(end) != Some(&b'\n') {
            return Err(err("record not followed by a newline"));
        }
        capture.records.push(Record {
            from_client,
            ts_ns,
            bytes: file.get(body..end).unwrap_or_default(),
        });
        at = end + 1;
    }
    Ok(capture)
}

/// An unsigned decimal number: ASCII digits only, no sign.
fn decimal<T: std::str::FromStr>(field: Option<&[u8]>) -> Option<T> {
    let field = field.filter(|f| !f.is_empty() && f.iter().all(u8::is_ascii_digit))?;
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// Writes a capture file: the comments (one line each; a newline inside one starts a
/// new comment line), then the records.
pub fn write(comments: &[&str], records: &[Record<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in comments.iter().flat_map(|c| c.split('\n')) {
        out.extend_from_slice(b"# ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    for r in records {
        let dir = if r.from_client { 'c' } else { 's' };
        out.extend_from_slice(format!("{dir} {} {}\n", r.ts_ns, r.bytes.len()).as_bytes());
        out.extend_from_slice(r.bytes);
        out.push(b'\n');
    }
    out
}

/// Every recorded capture of one protocol folder of `testdata/` (`http1`, `postgres`,
/// `mysql`, `redis`): (file name, contents), in name order.
#[cfg(test)]
pub(crate) fn recorded(protocol: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(protocol);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cap"))
        .map(|path| {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no captures in {}", dir.display());
    files
}

/// The protocol folders of `testdata/`.
#[cfg(test)]
pub(crate) const PROTOCOLS: [&str; 4] = ["http1", "postgres", "mysql", "redis"];

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(from_client: bool, ts_ns: u64, bytes: &[u8]) -> Record<'_> {
        Record {
            from_client,
            ts_ns,
            bytes,
        }
    }

    #[test]
    fn reads_comments_and_binary_records() {
        let file = b"# redis capture\n#no space\nc 5 3\n\n\0\n\ns 9 0\n\n# between\nc 9 2\nok\n";
        let cap = parse(file).unwrap();
        assert_eq!(cap.comments, ["redis capture", "no space", "between"]);
        assert_eq!(
            cap.records,
            [
                rec(true, 5, b"\n\0\n"),
                rec(false, 9, b""),
                rec(true, 9, b"ok")
            ]
        );
        assert_eq!(cap.stream(true), b"\n\0\nok");
        assert_eq!(cap.stream(false), b"");
        let chunk = cap.records[0].chunk();
        assert_eq!(
            (chunk.bytes, chunk.len, chunk.ts_ns),
            (&b"\n\0\n"[..], 3, 5)
        );
    }

    #[test]
    fn write_then_parse_is_the_identity() {
        let bytes: Vec<u8> = (0..=255).collect();
        let records = [
            rec(true, 0, b"GET / HTTP/1.1\r\n\r\n"),
            rec(false, 17, &bytes),
            rec(false, 17, b""),
            rec(true, u64::MAX, b"\n"),
        ];
        let file = write(&["first", "two\nlines"], &records);
        let cap = parse(&file).unwrap();
        assert_eq!(cap.comments, ["first", "two", "lines"]);
        assert_eq!(cap.records, records);
        assert_eq!(parse(b"").unwrap(), Capture::default());
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        for (file, offset, what) in [
            (&b"c 1 2\nab"[..], 0, "record runs past the end of the file"),
            (b"c 1 2\nabc", 0, "record not followed by a newline"),
            (b"c 1 2", 0, "line without a newline"),
            (b"x 1 2\nab\n", 0, "record does not start with `c ` or `s `"),
            (b"c -1 2\nab\n", 0, "bad timestamp"),
            (b"c 1 +2\nab\n", 0, "bad length"),
            (
                b"c 1 2 3\nab\n",
                0,
                "more than three fields in a record header",
            ),
            (b"c 1 99999999999999999999999\n", 0, "bad length"),
            (
                b"c 2 0\n\ns 1 0\n\n",
                7,
                "timestamp earlier than the record before",
            ),
            (b"# \xff\n", 0, "comment not UTF-8"),
            (b"\n", 0, "record does not start with `c ` or `s `"),
        ] {
            let got = parse(file).unwrap_err();
            assert_eq!(got, CaptureError { offset, what }, "{file:?}");
        }
        // Every truncation of a good file is either a shorter good file or an error.
        let file = write(&["x"], &[rec(true, 1, b"ab"), rec(false, 2, b"cd")]);
        for cut in 0..file.len() {
            if let Ok(cap) = parse(&file[..cut]) {
                assert!(cap.records.len() < 2);
            }
        }
    }

    #[test]
    fn every_recorded_capture_reads_and_writes_back_the_same() {
        for protocol in PROTOCOLS {
            for (name, file) in recorded(protocol) {
                let cap = parse(&file).unwrap_or_else(|e| panic!("{protocol}/{name}: {e}"));
                assert!(!cap.records.is_empty(), "{protocol}/{name}");
                assert!(
                    cap.comments
                        .first()
                        .is_some_and(|c| c.starts_with(protocol)),
                    "{protocol}/{name}: the first comment names the protocol"
                );
                assert_eq!(
                    write(&cap.comments, &cap.records),
                    file,
                    "{protocol}/{name}"
                );
            }
        }
    }
}
