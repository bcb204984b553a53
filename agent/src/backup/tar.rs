//! A streaming reader for the tar archives `pg_basebackup -Ft` writes.
//!
//! Bytes go in as they arrive, in chunks of any size; entries come out as
//! events. Nothing is buffered beyond one 512-byte header, so memory does not
//! depend on the archive. Knows tar (ustar, GNU long names, pax headers) and
//! nothing about PostgreSQL.

use std::fmt;

const BLOCK: usize = 512;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic or hard link, or anything else without data we care about.
    Other,
}

/// One archive member, as announced by its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path inside the archive, without a leading `./`.
    pub path: String,
    /// The data size in bytes.
    pub size: u64,
    /// What it is.
    pub kind: EntryKind,
}

/// What the reader saw, in order.
#[derive(Debug)]
pub enum Event<'a> {
    /// An entry starts; its data follows in `Data` events.
    Start(&'a Entry),
    /// Part of the current entry's data.
    Data(&'a [u8]),
    /// The current entry's data is complete.
    End(&'a Entry),
}

/// Why the bytes are not a tar archive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TarError {
    /// A header failed its checksum or has unreadable fields.
    #[error("corrupt tar header at byte {offset}: {detail}")]
    BadHeader {
        /// Where the header starts in the archive.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The input ended inside an entry or before the end-of-archive marker.
    #[error("tar archive truncated at byte {0}: the end-of-archive marker is missing")]
    Truncated(u64),
}

enum State {
    Header,
    Data { remaining: u64, padding: usize },
    Skip { remaining: u64, long_name: bool },
    Finished,
}

/// The streaming reader. Feed it with [`TarReader::feed`], then call
/// [`TarReader::finish`].
pub struct TarReader {
    state: State,
    header: Vec<u8>,
    offset: u64,
    current: Option<Entry>,
    long_name: Option<(u8, u64)>,
    pax_buf: Vec<u8>,
}

impl fmt::Debug for TarReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TarReader")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Default for TarReader {
    fn default() -> Self {
        Self::new()
    }
}

impl TarReader {
    /// A reader at the start of an archive.
    #[must_use]
    pub fn new() -> Self {
        TarReader {
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            offset: 0,
            current: None,
            long_name: None,
            pax_buf: Vec::new(),
        }
    }

    /// Whether the end-of-archive marker has been read.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// Consumes `buf`, calling `on_event` for each event.
    ///
    /// # Errors
    /// A corrupt header; whatever `on_event` returns.
    pub fn feed<E: From<TarError>>(
        &mut self,
        mut buf: &[u8],
        on_event: &mut impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !buf.is_empty() {
            match &mut self.state {
                State::Finished => {
                    // Zero padding after the end marker (blocking factor).
                    self.offset += buf.len() as u64;
                    return Ok(());
                }
                State::Header => {
                    let take = (BLOCK - self.header.len()).min(buf.len());
                    self.header.extend_from_slice(&buf[..take]);
                    buf = &buf[take..];
                    self.offset += take as u64;
                    if self.header.len() == BLOCK {
                        let header = std::mem::replace(&mut self.header, Vec::with_capacity(BLOCK));
                        self.header_complete(&header, on_event)?;
                    }
                }
                State::Data { remaining, padding } => {
                    if *remaining > 0 {
                        let take = usize::try_from(*remaining)
                            .unwrap_or(usize::MAX)
                            .min(buf.len());
                        *remaining -= take as u64;
                        self.offset += take as u64;
                        let (data, rest) = buf.split_at(take);
                        buf = rest;
                        on_event(Event::Data(data))?;
                        continue;
                    }
                    let take = (*padding).min(buf.len());
                    *padding -= take;
                    buf = &buf[take..];
                    self.offset += take as u64;
                    if *padding == 0 {
                        self.state = State::Header;
                        if let Some(entry) = self.current.take() {
                            on_event(Event::End(&entry))?;
                        }
                    }
                }
                State::Skip {
                    remaining,
                    long_name,
                } => {
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    if *long_name {
                        self.pax_buf.extend_from_slice(&buf[..take]);
                    }
                    *remaining -= take as u64;
                    buf = &buf[take..];
                    self.offset += take as u64;
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                }
            }
        }
        // An entry with no data (or whose data ended exactly here) is complete.
        if let State::Data {
            remaining: 0,
            padding: 0,
        } = self.state
        {
            self.state = State::Header;
            if let Some(entry) = self.current.take() {
                on_event(Event::End(&entry))?;
            }
        }
        Ok(())
    }

    /// Checks that the archive ended properly.
    ///
    /// # Errors
    /// [`TarError::Truncated`] if the end-of-archive marker never came.
    pub fn finish(&self) -> Result<(), TarError> {
        if self.is_finished() {
            Ok(())
        } else {
            Err(TarError::Truncated(self.offset))
        }
    }

    fn header_complete<E: From<TarError>>(
        &mut self,
        header: &[u8],
        on_event: &mut impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let offset = self.offset - BLOCK as u64;
        if header.iter().all(|&b| b == 0) {
            // The first of the two zero blocks that end the archive.
            self.state = State::Finished;
            return Ok(());
        }
        let bad = |detail: String| TarError::BadHeader { offset, detail };
        let stored = parse_octal(&header[148..156]).map_err(|e| bad(format!("checksum: {e}")))?;
        let computed: u64 = header
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if stored != computed {
            return Err(bad(format!(
                "checksum {stored} does not match the header's {computed}"
            ))
            .into());
        }
        let size = parse_octal(&header[124..136]).map_err(|e| bad(format!("size: {e}")))?;
        let typeflag = header[156];
        // GNU long name ('L') and pax headers ('x'): their data names the next entry.
        if typeflag == b'L' || typeflag == b'x' {
            self.pax_buf.clear();
            self.long_name = Some((typeflag, size));
            self.state = State::Skip {
                remaining: padded(size),
                long_name: true,
            };
            return Ok(());
        }
        if typeflag == b'g' || typeflag == b'K' {
            self.state = State::Skip {
                remaining: padded(size),
                long_name: false,
            };
            return Ok(());
        }
        let mut path = match self.long_name.take() {
            Some((kind, meta_size)) => {
                let data = std::mem::take(&mut self.pax_buf);
                let data = &data[..usize::try_from(meta_size).unwrap_or(0).min(data.len())];
                if kind == b'L' {
                    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                    Some(String::from_utf8_lossy(&data[..end]).into_owned())
                } else {
                    pax_path(data)
                }
            }
            None => None,
        }
        .unwrap_or_else(|| {
            let name = field_str(&header[..100]);
            let prefix = if &header[257..262] == b"ustar" {
                field_str(&header[345..500])
            } else {
                String::new()
            };
            if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            }
        });
        if let Some(stripped) = path.strip_prefix("./") {
            path = stripped.to_owned();
        }
        let kind = match typeflag {
            b'0' | 0 | b'7' => EntryKind::File,
            b'5' => EntryKind::Directory,
            _ => EntryKind::Other,
        };
        // Links and directories carry no data whatever their size field says.
        let data_size = if matches!(typeflag, b'1' | b'2' | b'5') {
            0
        } else {
            size
        };
        let entry = Entry {
            path: path.trim_end_matches('/').to_owned(),
            size: data_size,
            kind,
        };
        on_event(Event::Start(&entry))?;
        self.current = Some(entry);
        self.state = State::Data {
            remaining: data_size,
            padding: usize::try_from(padded(data_size) - data_size).expect("under 512"),
        };
        Ok(())
    }
}

/// `size` rounded up to whole blocks.
fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

fn field_str(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// A numeric header field: octal text, or base-256 when the high bit is set.
fn parse_octal(field: &[u8]) -> Result<u64, String> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            value = value
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or("base-256 number too large")?;
        }
        return Ok(value);
    }
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| format!("{text:?} is not an octal number"))
}

/// The `path` record of a pax extended header.
fn pax_path(data: &[u8]) -> Option<String> {
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        let record = rest.get(space + 1..len)?;
        if let Some(value) = record.strip_prefix(b"path=") {
            let value = value.strip_suffix(b"\n").unwrap_or(value);
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        rest = &rest[len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header for a regular file or directory.
    fn header(path: &str, size: usize, typeflag: u8) -> Vec<u8> {
        let mut h = vec![0u8; BLOCK];
        h[..path.len()].copy_from_slice(path.as_bytes());
        h[100..107].copy_from_slice(b"0000600");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = header("base/", 0, b'5');
        for (path, data) in files {
            out.extend(header(path, data.len(), b'0'));
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        }
        out.extend(vec![0u8; 2 * BLOCK]);
        out
    }

    fn read(bytes: &[u8], chunk: usize) -> Result<Vec<(String, Vec<u8>)>, TarError> {
        let mut reader = TarReader::new();
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut ended = 0;
        for piece in bytes.chunks(chunk) {
            reader.feed(piece, &mut |event: Event<'_>| {
                match event {
                    Event::Start(e) if e.kind == EntryKind::File => {
                        files.push((e.path.clone(), Vec::new()));
                    }
                    Event::Start(_) => files.push((String::new(), Vec::new())),
                    Event::Data(d) => files.last_mut().expect("started").1.extend_from_slice(d),
                    Event::End(_) => ended += 1,
                }
                Ok::<(), TarError>(())
            })?;
        }
        reader.finish()?;
        assert_eq!(ended, files.len(), "every entry ends");
        Ok(files.into_iter().filter(|(p, _)| !p.is_empty()).collect())
    }

    #[test]
    fn reads_entries_in_any_chunking() {
        let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let files: &[(&str, &[u8])] = &[
            ("backup_label", b"START WAL LOCATION: 0/2000028\n"),
            ("empty", b""),
            ("base/1/1259", &big),
            ("exact", &[7u8; 512]),
        ];
        let bytes = archive(files);
        for chunk in [1, 7, 511, 512, 513, 4096, bytes.len()] {
            let got = read(&bytes, chunk).expect("valid archive");
            assert_eq!(got.len(), files.len(), "chunk {chunk}");
            for ((path, data), (want_path, want)) in got.iter().zip(files) {
                assert_eq!(path, want_path);
                assert_eq!(data.as_slice(), *want, "{path} with chunk {chunk}");
            }
        }
    }

    #[test]
    fn detects_corruption_and_truncation() {
        let mut bytes = archive(&[("a", b"hello")]);
        let truncated = &bytes[..bytes.len() - 1024];
        assert!(matches!(read(truncated, 100), Err(TarError::Truncated(_))));
        bytes[BLOCK + 3] ^= 0x20; // the second header's name
        assert!(matches!(
            read(&bytes, 100),
            Err(TarError::BadHeader { offset: 512, .. })
        ));
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_octal(b"00000001750\0"), Ok(1000));
        assert_eq!(parse_octal(b"     17 \0"), Ok(15));
        assert_eq!(
            parse_octal(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00]),
            Ok(256)
        );
        assert!(parse_octal(b"12x").is_err());
        assert_eq!(
            pax_path(b"20 path=a/long/name\n12 mtime=1\n"),
            Some("a/long/name".into())
        );
    }
}
