//! Corpus input: resolving files, and streaming them (or a shard's bytes) into documents.
//!
//! Two formats, chosen by extension: google-research/bert text (`*.txt` and anything else: one
//! sentence per line, a blank line between documents) and JSONL (`*.jsonl`, `*.json`: one
//! `{"text": ...}` object per line, one document each, its sentences the lines of `text`).
//! Every line is checked (UTF-8, at most `max_line_bytes`); a bad one fails with `file:line`
//! or, under [`ErrorPolicy::Skip`], is counted and skipped. CRLF and a leading UTF-8 BOM are
//! accepted. Memory is bounded by one line (one document while collecting it), never a file.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default longest line: 4 MiB (a JSONL record holds a whole document on one line).
pub const DEFAULT_MAX_LINE_BYTES: usize = 4 << 20;

/// A document: its sentences, trimmed and non-empty.
pub type Document = Vec<String>;

/// How a file's lines become documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One sentence per line, documents separated by blank lines (google-research/bert).
    Text,
    /// One JSON object per line with a string field `text`; its lines are the sentences.
    Jsonl,
}

impl Format {
    /// `.jsonl` and `.json` (any case) are JSONL; everything else is text.
    pub fn from_path(path: &Path) -> Format {
        let ext = path.extension().and_then(|e| e.to_str());
        match ext.map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("jsonl") | Some("json") => Format::Jsonl,
            _ => Format::Text,
        }
    }
}

/// What to do with a line (text) or record (JSONL) that fails validation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    /// Stop with an error naming the file and line.
    #[default]
    Fail,
    /// Skip it, count it ([`ParseStats`]) and log the counts.
    Skip,
}

/// Validation settings of corpus parsing (the same on the coordinator and on workers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorpusOptions {
    /// Longest accepted line in bytes, without its line end (a JSONL record is one line).
    pub max_line_bytes: usize,
    /// A bad line or record: `fail` (default) or `skip`.
    pub on_error: ErrorPolicy,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            on_error: ErrorPolicy::Fail,
        }
    }
}

/// Counts of one parse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParseStats {
    /// Documents read.
    pub documents: u64,
    /// Sentences in those documents.
    pub sentences: u64,
    /// Text lines skipped under [`ErrorPolicy::Skip`].
    pub skipped_lines: u64,
    /// JSONL records skipped under [`ErrorPolicy::Skip`].
    pub skipped_records: u64,
}

impl ParseStats {
    pub(crate) fn add(&mut self, o: &ParseStats) {
        self.documents += o.documents;
        self.sentences += o.sentences;
        self.skipped_lines += o.skipped_lines;
        self.skipped_records += o.skipped_records;
    }

    /// Logs the skip counts, if any, for `origin`.
    pub fn warn_skipped(&self, origin: &str) {
        if self.skipped_lines + self.skipped_records > 0 {
            tracing::warn!(
                origin,
                skipped_lines = self.skipped_lines,
                skipped_records = self.skipped_records,
                "skipped bad corpus input"
            );
        }
    }
}

/// Resolves files, directories (recursively; names starting with `.` are ignored) and glob
/// patterns into a sorted, de-duplicated list of canonical file paths.
pub fn resolve_inputs<P: AsRef<Path>>(inputs: &[P]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let input = input.as_ref();
        let s = input.to_string_lossy();
        if !input.exists() && s.contains(['*', '?', '[']) {
            let paths =
                glob::glob(&s).map_err(|e| Error::Data(format!("input pattern `{s}`: {e}")))?;
            let mut any = false;
            for p in paths {
                let p = p.map_err(|e| Error::io(e.path().to_path_buf(), e.into()))?;
                any = true;
                collect(&p, &mut out)?;
            }
            if !any {
                return Err(Error::Data(format!("input pattern `{s}` matches no file")));
            }
        } else if input.exists() {
            collect(input, &mut out)?;
        } else {
            return Err(Error::Data(format!(
                "input {}: no such file or directory",
                input.display()
            )));
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        let names: Vec<_> = inputs.iter().map(|p| p.as_ref().display()).collect();
        return Err(Error::Data(format!("no corpus files found in {names:?}")));
    }
    Ok(out)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        out.push(path.canonicalize().map_err(|e| Error::io(path, e))?);
    } else if meta.is_dir() {
        let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            // Real directories only: a symlinked directory could loop.
            if ft.is_dir() || entry.path().is_file() {
                collect(&entry.path(), out)?;
            }
        }
    }
    Ok(())
}

/// Parses one buffer (a whole file's bytes, e.g. fetched over the network) into documents.
/// `origin` names the source in messages (`origin:line`).
pub fn parse_documents(
    bytes: &[u8],
    format: Format,
    opts: &CorpusOptions,
    origin: &str,
) -> Result<Vec<Document>> {
    let mut stats = ParseStats::default();
    let docs = parse_piece(bytes, format, opts, origin, 1, &mut stats)?;
    stats.warn_skipped(origin);
    Ok(docs)
}

/// Parses a piece of a file that starts at a document boundary on line `first_line`
/// (1 = the file's start, where a BOM is accepted), adding its counts to `stats`.
pub fn parse_piece(
    bytes: &[u8],
    format: Format,
    opts: &CorpusOptions,
    origin: &str,
    first_line: u64,
    stats: &mut ParseStats,
) -> Result<Vec<Document>> {
    let mut reader = LineReader::new(bytes, opts.max_line_bytes, first_line);
    let mut asm = Assembler::new(format, opts, origin, first_line == 1);
    let mut docs = Vec::new();
    while let Some(line) = reader
        .next_line(&mut |_| {})
        .map_err(|e| Error::io(origin, e))?
    {
        if let (_, Some(d)) = asm.line(&line, reader.content(&line))? {
            docs.push(d);
        }
    }
    docs.extend(asm.finish());
    stats.add(&asm.stats);
    Ok(docs)
}

/// Streams the documents of files in order, one document in memory at a time.
pub struct DocumentReader {
    files: std::vec::IntoIter<PathBuf>,
    opts: CorpusOptions,
    current: Option<(LineReader<BufReader<File>>, Assembler, String)>,
    /// Counts over the files finished so far.
    pub stats: ParseStats,
    failed: bool,
}

impl DocumentReader {
    /// Reads `files` in order with `opts`.
    pub fn new(files: Vec<PathBuf>, opts: CorpusOptions) -> Self {
        DocumentReader {
            files: files.into_iter(),
            opts,
            current: None,
            stats: ParseStats::default(),
            failed: false,
        }
    }

    fn step(&mut self) -> Result<Option<Document>> {
        loop {
            let Some((reader, asm, origin)) = self.current.as_mut() else {
                let Some(path) = self.files.next() else {
                    return Ok(None);
                };
                let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
                let origin = path.display().to_string();
                let asm = Assembler::new(Format::from_path(&path), &self.opts, &origin, true);
                let reader = LineReader::new(BufReader::new(f), self.opts.max_line_bytes, 1);
                self.current = Some((reader, asm, origin));
                continue;
            };
            match reader.next_line(&mut |_| {}) {
                Err(e) => return Err(Error::io(origin.as_str(), e)),
                Ok(Some(line)) => {
                    if let (_, Some(d)) = asm.line(&line, reader.content(&line))? {
                        return Ok(Some(d));
                    }
                }
                Ok(None) => {
                    let last = asm.finish();
                    asm.stats.warn_skipped(origin);
                    self.stats.add(&asm.stats);
                    self.current = None;
                    if last.is_some() {
                        return Ok(last);
                    }
                }
            }
        }
    }
}

impl Iterator for DocumentReader {
    type Item = Result<Document>;

    fn next(&mut self) -> Option<Result<Document>> {
        if self.failed {
            return None;
        }
        let r = self.step();
        self.failed = r.is_err();
        r.transpose()
    }
}

/// Where a line lies and how long it is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LineSpan {
    /// Byte offset of the line's first byte (relative to where the reader started + `base`).
    pub start: u64,
    /// Offset just past its line end.
    pub end: u64,
    /// 1-based line number.
    pub number: u64,
    /// Length without the line end (`\n` or `\r\n`).
    pub content_len: u64,
    /// Longer than could be kept: its bytes went to the overflow sink, not to `raw()`.
    pub overflowed: bool,
}

/// A line splitter over any `BufRead` that keeps at most `max_line_bytes + 2` bytes of a line:
/// longer lines are streamed to a caller's sink and reported as too long.
pub(crate) struct LineReader<R> {
    inner: R,
    cap: usize,
    pos: u64,
    number: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R, max_line_bytes: usize, first_line: u64) -> Self {
        LineReader {
            inner,
            cap: max_line_bytes.saturating_add(2),
            pos: 0,
            number: first_line.saturating_sub(1),
            buf: Vec::new(),
        }
    }

    /// Reads the next line. Bytes of a line too long to keep are passed to `overflow`.
    pub fn next_line(
        &mut self,
        overflow: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<Option<LineSpan>> {
        self.buf.clear();
        let start = self.pos;
        let mut len = 0u64;
        let mut overflowed = false;
        let mut ended = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                break;
            }
            let (take, found) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            let chunk = &avail[..take];
            if !overflowed && self.buf.len() + take > self.cap {
                overflowed = true;
                overflow(&self.buf);
                self.buf.clear();
            }
            if overflowed {
                overflow(chunk);
            } else {
                self.buf.extend_from_slice(chunk);
            }
            len += take as u64;
            self.inner.consume(take);
            if found {
                ended = true;
                break;
            }
        }
        if len == 0 {
            return Ok(None);
        }
        self.pos += len;
        self.number += 1;
        let mut content_len = len - ended as u64;
        if !overflowed && self.buf[..content_len as usize].last() == Some(&b'\r') {
            content_len -= 1;
        }
        Ok(Some(LineSpan {
            start,
            end: self.pos,
            number: self.number,
            content_len,
            overflowed,
        }))
    }

    /// The raw bytes of the last line, line end included (empty if it overflowed).
    pub fn raw(&self) -> &[u8] {
        &self.buf
    }

    /// The content of the last line (no line end), or `None` if it overflowed.
    pub fn content(&self, line: &LineSpan) -> Option<&[u8]> {
        (!line.overflowed).then(|| &self.buf[..line.content_len as usize])
    }
}

/// Turns validated lines into documents; the same state machine on the coordinator's scan and
/// on a worker's parse, so both agree on every document boundary.
pub(crate) struct Assembler {
    format: Format,
    max: usize,
    policy: ErrorPolicy,
    origin: String,
    bom_allowed: bool,
    current: Document,
    pub stats: ParseStats,
}

impl Assembler {
    pub fn new(format: Format, opts: &CorpusOptions, origin: &str, at_file_start: bool) -> Self {
        Assembler {
            format,
            max: opts.max_line_bytes,
            policy: opts.on_error,
            origin: origin.to_string(),
            bom_allowed: at_file_start,
            current: Vec::new(),
            stats: ParseStats::default(),
        }
    }

    fn bad(&mut self, line: u64, msg: String) -> Result<(bool, Option<Document>)> {
        match self.policy {
            ErrorPolicy::Fail => Err(Error::Corpus {
                origin: self.origin.clone(),
                line,
                msg,
            }),
            ErrorPolicy::Skip => {
                match self.format {
                    Format::Text => self.stats.skipped_lines += 1,
                    Format::Jsonl => self.stats.skipped_records += 1,
                }
                Ok((false, None))
            }
        }
    }

    /// Feeds one line. Returns whether it starts a document (a shard may be cut before it)
    /// and the document it completes, if any.
    pub fn line(
        &mut self,
        span: &LineSpan,
        content: Option<&[u8]>,
    ) -> Result<(bool, Option<Document>)> {
        let bom_allowed = std::mem::take(&mut self.bom_allowed);
        let n = span.number;
        let content = match content {
            Some(c) if span.content_len as usize <= self.max => c,
            _ => {
                let msg = format!(
                    "line is {} bytes, over the limit of {} (max_line_bytes)",
                    span.content_len, self.max
                );
                return self.bad(n, msg);
            }
        };
        let content = match (bom_allowed, content.strip_prefix(b"\xEF\xBB\xBF")) {
            (true, Some(rest)) => rest,
            _ => content,
        };
        let text = match std::str::from_utf8(content) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1);
                return self.bad(n, msg);
            }
        };
        match self.format {
            Format::Text => {
                let t = text.trim();
                if t.is_empty() {
                    return Ok((false, self.take()));
                }
                let starts = self.current.is_empty();
                self.current.push(t.to_string());
                Ok((starts, None))
            }
            Format::Jsonl => {
                if text.trim().is_empty() {
                    return Ok((false, None));
                }
                let v: serde_json::Value = match serde_json::from_str(text) {
                    Ok(v) => v,
                    Err(e) => {
                        let s = e.to_string();
                        let what = s.rsplit_once(" at line ").map_or(s.as_str(), |(a, _)| a);
                        let msg = format!("invalid JSON at column {}: {what}", e.column());
                        return self.bad(n, msg);
                    }
                };
                let Some(body) = v.get("text").and_then(|t| t.as_str()) else {
                    let msg = "expected a JSON object with a string field \"text\"".to_string();
                    return self.bad(n, msg);
                };
                self.current = body
                    .lines()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                let doc = self.take();
                Ok((doc.is_some(), doc))
            }
        }
    }

    fn take(&mut self) -> Option<Document> {
        if self.current.is_empty() {
            return None;
        }
        self.stats.documents += 1;
        self.stats.sentences += self.current.len() as u64;
        Some(std::mem::take(&mut self.current))
    }

    /// Ends the input: the document in progress, if any.
    pub fn finish(&mut self) -> Option<Document> {
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_reader_keeps_offsets_and_strips_crlf() {
        let data = b"ab\r\n\ncd";
        let mut r = LineReader::new(&data[..], 10, 1);
        let a = r.next_line(&mut |_| {}).unwrap().unwrap();
        assert_eq!((a.start, a.end, a.number, a.content_len), (0, 4, 1, 2));
        assert_eq!(r.content(&a), Some(&b"ab"[..]));
        let b = r.next_line(&mut |_| {}).unwrap().unwrap();
        assert_eq!((b.start, b.end, b.content_len), (4, 5, 0));
        let c = r.next_line(&mut |_| {}).unwrap().unwrap();
        assert_eq!((c.start, c.end, c.number), (5, 7, 3));
        assert!(r.next_line(&mut |_| {}).unwrap().is_none());
    }

    #[test]
    fn overflowing_line_streams_every_byte_to_the_sink() {
        let data = b"0123456789abcdef\nok\n";
        let mut r = LineReader::new(std::io::BufReader::with_capacity(3, &data[..]), 4, 1);
        let mut seen = Vec::new();
        let l = r
            .next_line(&mut |b| seen.extend_from_slice(b))
            .unwrap()
            .unwrap();
        assert!(l.overflowed);
        assert_eq!(seen, b"0123456789abcdef\n");
        assert_eq!(l.content_len, 16);
        let l = r.next_line(&mut |_| panic!("short line")).unwrap().unwrap();
        assert_eq!(r.content(&l), Some(&b"ok"[..]));
    }
}
