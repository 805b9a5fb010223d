//! The export file: one JSON object per line, each a [`DlqMessage`] (`message_id`, `body`,
//! `attributes`, `receive_count`, `sent_at_ms`, `group_id`, `dedup_id`). Bodies and attribute
//! values are JSON strings, so they round-trip byte for byte whatever they hold.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{DlqError, DlqMessage};

/// Writes an export file; the data is durable only after [`ExportWriter::finish`].
#[derive(Debug)]
pub struct ExportWriter {
    out: BufWriter<File>,
    path: PathBuf,
    written: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DlqError + '_ {
    move |source| DlqError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl ExportWriter {
    /// Creates `path`; an existing file is refused ([`DlqError::FileExists`]) unless
    /// `replace`, when it is truncated.
    ///
    /// # Errors
    /// [`DlqError::FileExists`], [`DlqError::Io`].
    pub fn create(path: &Path, replace: bool) -> Result<Self, DlqError> {
        let mut open = OpenOptions::new();
        open.write(true);
        if replace {
            open.create(true).truncate(true);
        } else {
            open.create_new(true);
        }
        let file = open.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                DlqError::FileExists {
                    path: path.display().to_string(),
                }
            } else {
                io(path)(e)
            }
        })?;
        Ok(Self {
            out: BufWriter::new(file),
            path: path.to_path_buf(),
            written: 0,
        })
    }

    /// Appends one message.
    ///
    /// # Errors
    /// [`DlqError::Io`].
    pub fn write(&mut self, message: &DlqMessage) -> Result<(), DlqError> {
        serde_json::to_writer(&mut self.out, message).map_err(|e| DlqError::Io {
            path: self.path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        self.out.write_all(b"\n").map_err(io(&self.path))?;
        self.written += 1;
        Ok(())
    }

    /// Messages written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes and fsyncs the file and its directory: after this returns, the export survives
    /// a crash or power cut, and only then may the exported messages be deleted.
    ///
    /// # Errors
    /// [`DlqError::Io`].
    pub fn finish(self) -> Result<u64, DlqError> {
        let path = self.path.clone();
        let file = self.out.into_inner().map_err(|e| DlqError::Io {
            path: path.display().to_string(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&path))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(self.written)
    }
}

/// Reads an export file line by line.
#[derive(Debug)]
pub struct ExportReader {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
    line: u64,
}

impl ExportReader {
    /// Opens `path`.
    ///
    /// # Errors
    /// [`DlqError::Io`].
    pub fn open(path: &Path) -> Result<Self, DlqError> {
        let file = File::open(path).map_err(io(path))?;
        Ok(Self {
            lines: BufReader::new(file).lines(),
            path: path.to_path_buf(),
            line: 0,
        })
    }

    /// Reads the whole file and counts its messages, so that a bad line is found before
    /// anything is sent rather than after part of the file was.
    ///
    /// # Errors
    /// As [`Self::next_chunk`].
    pub fn count(path: &Path) -> Result<u64, DlqError> {
        let mut reader = Self::open(path)?;
        let mut n = 0_u64;
        loop {
            let chunk = reader.next_chunk(1_000)?;
            if chunk.is_empty() {
                return Ok(n);
            }
            n += chunk.len() as u64;
        }
    }

    /// Up to `n` next messages (empty at the end of the file); blank lines are skipped.
    ///
    /// # Errors
    /// [`DlqError::Io`], or [`DlqError::Invalid`] naming the line that is not a message.
    pub fn next_chunk(&mut self, n: usize) -> Result<Vec<DlqMessage>, DlqError> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(line) = self.lines.next() else {
                break;
            };
            self.line += 1;
            let line = line.map_err(io(&self.path))?;
            if line.trim().is_empty() {
                continue;
            }
            let message: DlqMessage = serde_json::from_str(&line).map_err(|e| {
                DlqError::Invalid(format!(
                    "{}:{}: not an exported message ({e})",
                    self.path.display(),
                    self.line,
                ))
            })?;
            out.push(message);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn any_body_and_attribute_round_trips_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.ndjson");
        let messages: Vec<DlqMessage> = [
            "plain",
            "{\"v\":1,\"events\":[]}",
            "line\nbreak\ttab \u{1F600} \\ \" \u{0}",
            "",
        ]
        .iter()
        .enumerate()
        .map(|(i, b)| DlqMessage {
            message_id: i.to_string(),
            body: (*b).to_owned(),
            attributes: BTreeMap::from([("k\n".to_owned(), format!("v{b}"))]),
            receive_count: 2,
            sent_at_ms: Some(5),
            group_id: Some("g".into()),
            dedup_id: None,
            body_error: None,
        })
        .collect();
        let mut w = ExportWriter::create(&path, false).unwrap();
        for m in &messages {
            w.write(m).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 4);
        let mut r = ExportReader::open(&path).unwrap();
        let mut back = r.next_chunk(3).unwrap();
        back.extend(r.next_chunk(3).unwrap());
        assert!(r.next_chunk(3).unwrap().is_empty());
        assert_eq!(back, messages);
    }

    #[test]
    fn an_existing_file_is_kept_unless_replacing_it_was_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.ndjson");
        std::fs::write(&path, "an earlier export\n").unwrap();
        let err = ExportWriter::create(&path, false).unwrap_err();
        assert!(matches!(err, DlqError::FileExists { .. }), "{err:?}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "an earlier export\n"
        );
        let w = ExportWriter::create(&path, true).unwrap();
        assert_eq!(w.finish().unwrap(), 0);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.ndjson");
        std::fs::write(&path, "\n{\"nope\":1}\n").unwrap();
        let err = ExportReader::open(&path)
            .unwrap()
            .next_chunk(10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.ndjson:2"), "{err}");
    }
}
