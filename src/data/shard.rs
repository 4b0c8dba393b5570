//! Document-aligned shards of a corpus, their checksummed index, and the per-epoch plan.
//!
//! One streaming scan cuts the corpus (files in sorted order) into shards of about a target
//! size, only where a document starts, so a shard may span files but never splits a document.
//! Every shard holds at least two documents (NSP draws its random B from another document of
//! the same shard). A shard is the unit the coordinator serves and a rank consumes: its bytes
//! are the concatenation of its ranges, checksummed with SHA-256.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::corpus::{
    resolve_inputs, Assembler, CorpusOptions, Document, Format, LineReader, ParseStats,
};
use crate::error::{Error, Result};

/// Version of the index's JSON layout.
pub const INDEX_VERSION: u32 = 1;

/// One corpus file as it was when the index was built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusFile {
    /// The file's path.
    pub path: PathBuf,
    /// Text or JSONL.
    pub format: Format,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
}

/// Bytes `start..end` of file `file` (an index into [`ShardIndex::files`]), beginning at the
/// start of line `first_line` (1-based), which is also a document boundary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRange {
    /// Index of the file in [`ShardIndex::files`].
    pub file: u32,
    /// First byte of the range.
    pub start: u64,
    /// One past the last byte of the range.
    pub end: u64,
    /// Line number (1-based) at `start`.
    pub first_line: u64,
}

/// One shard: whole documents from one or more consecutive files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSpec {
    /// Stable id: the shard's position in corpus order.
    pub id: u32,
    /// The byte ranges, in order.
    pub ranges: Vec<ShardRange>,
    /// Documents in the shard.
    pub documents: u64,
    /// Sum of the ranges' lengths.
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the concatenated range bytes.
    pub sha256: String,
}

/// The shards of a corpus and the files they come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardIndex {
    /// [`INDEX_VERSION`] of the layout it was written with.
    pub version: u32,
    /// The shard size the corpus was cut to (shards end at document boundaries, so vary).
    pub target_shard_bytes: u64,
    /// The parsing options the document counts depend on; workers must parse with these.
    pub options: CorpusOptions,
    /// The corpus files, in order.
    pub files: Vec<CorpusFile>,
    /// The shards, in id order.
    pub shards: Vec<ShardSpec>,
    /// Counts of the scan (documents, sentences, skipped lines and records).
    pub stats: ParseStats,
}

/// Closes the corpus's last shard `cur`: a lone last document joins the previous shard (whose
/// hash, continued over it, is `prev_ext`); a corpus of one document cannot make NSP pairs.
fn close_last(
    cur: Open,
    prev_ext: Option<Sha256>,
    shards: &mut Vec<ShardSpec>,
    what: &str,
) -> Result<()> {
    match (cur.documents, shards.last_mut()) {
        (1, None) => Err(Error::Data(format!(
            "NSP needs at least two documents; the corpus ({what}) holds one"
        ))),
        (1, Some(last)) => {
            for r in cur.ranges {
                match last.ranges.last_mut() {
                    Some(l) if l.file == r.file && l.end == r.start => l.end = r.end,
                    _ => last.ranges.push(r),
                }
            }
            last.documents += 1;
            last.bytes += cur.bytes;
            last.sha256 = hex(prev_ext.expect("hash kept").finalize());
            Ok(())
        }
        _ => {
            shards.push(cur.spec(shards.len() as u32));
            Ok(())
        }
    }
}

impl ShardIndex {
    /// The index of no corpus, for a job whose stages all fine-tune.
    pub fn empty(target_shard_bytes: u64, options: CorpusOptions) -> ShardIndex {
        ShardIndex {
            version: INDEX_VERSION,
            target_shard_bytes,
            options,
            files: vec![],
            shards: vec![],
            stats: ParseStats::default(),
        }
    }
}

/// The shard being filled during the scan.
struct Open {
    ranges: Vec<ShardRange>,
    documents: u64,
    bytes: u64,
    hasher: Sha256,
}

impl Open {
    fn new() -> Self {
        Open {
            ranges: Vec::new(),
            documents: 0,
            bytes: 0,
            hasher: Sha256::new(),
        }
    }

    fn begin(&mut self, file: u32, start: u64, first_line: u64) {
        self.ranges.push(ShardRange {
            file,
            start,
            end: start,
            first_line,
        });
    }

    fn drop_empty_range(&mut self) {
        if self.ranges.last().is_some_and(|r| r.start == r.end) {
            self.ranges.pop();
        }
    }

    /// The closed shard `id`, with its hash.
    fn spec(self, id: u32) -> ShardSpec {
        ShardSpec {
            id,
            ranges: self.ranges,
            documents: self.documents,
            bytes: self.bytes,
            sha256: hex(self.hasher.finalize()),
        }
    }
}

fn hex(d: impl std::fmt::LowerHex) -> String {
    format!("{d:x}")
}

/// Scans `inputs` (files, directories, globs) once and cuts them into shards of about
/// `target_shard_bytes` (a shard is closed at the first document start at or past the
/// target, once it holds two documents; a lone last document joins the previous shard).
pub fn build_index<P: AsRef<Path>>(
    inputs: &[P],
    target_shard_bytes: u64,
    opts: &CorpusOptions,
) -> Result<ShardIndex> {
    let paths = resolve_inputs(inputs)?;
    let target = target_shard_bytes.max(1);
    let mut files = Vec::with_capacity(paths.len());
    let mut shards: Vec<ShardSpec> = Vec::new();
    let mut stats = ParseStats::default();
    let mut cur = Open::new();
    // The last closed shard's hash continued over `cur`'s bytes, kept while `cur` holds at
    // most one document: if the corpus ends there, that document joins the previous shard.
    let mut prev_ext: Option<Sha256> = None;
    for (fi, path) in paths.iter().enumerate() {
        let fi =
            u32::try_from(fi).map_err(|_| Error::Data("more than 2^32 corpus files".into()))?;
        let origin = path.display().to_string();
        let format = Format::from_path(path);
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader =
            LineReader::new(BufReader::with_capacity(1 << 20, f), opts.max_line_bytes, 1);
        let mut asm = Assembler::new(format, opts, &origin, true);
        let mut file_hasher = Sha256::new();
        let mut size = 0u64;
        cur.begin(fi, 0, 1);
        loop {
            let line = reader.next_line(&mut |b| {
                file_hasher.update(b);
                cur.hasher.update(b);
                if let Some(p) = prev_ext.as_mut() {
                    p.update(b);
                }
            });
            let Some(line) = line.map_err(|e| Error::io(path, e))? else {
                break;
            };
            let (starts, _) = asm.line(&line, reader.content(&line))?;
            if starts {
                if cur.documents >= 2 && cur.bytes >= target {
                    cur.drop_empty_range();
                    let done = std::mem::replace(&mut cur, Open::new());
                    prev_ext = Some(done.hasher.clone());
                    shards.push(done.spec(shards.len() as u32));
                    cur.begin(fi, line.start, line.number);
                }
                cur.documents += 1;
                if cur.documents >= 2 {
                    prev_ext = None;
                }
            }
            if !line.overflowed {
                let raw = reader.raw();
                file_hasher.update(raw);
                cur.hasher.update(raw);
                if let Some(p) = prev_ext.as_mut() {
                    p.update(raw);
                }
            }
            let n = line.end - line.start;
            cur.bytes += n;
            size += n;
            if let Some(r) = cur.ranges.last_mut() {
                r.end = line.end;
            }
        }
        asm.finish();
        asm.stats.warn_skipped(&origin);
        stats.add(&asm.stats);
        cur.drop_empty_range();
        files.push(CorpusFile {
            path: path.clone(),
            format,
            size,
            sha256: hex(file_hasher.finalize()),
        });
    }
    let names: Vec<_> = inputs.iter().map(|p| p.as_ref().display()).collect();
    let what = format!("{} file(s) from {names:?}", paths.len());
    if stats.documents == 0 {
        return Err(Error::Data(format!("empty corpus: no documents in {what}")));
    }
    close_last(cur, prev_ext, &mut shards, &what)?;
    Ok(ShardIndex {
        version: INDEX_VERSION,
        target_shard_bytes,
        options: opts.clone(),
        files,
        shards,
        stats,
    })
}

impl ShardIndex {
    /// Writes the index as JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        crate::util::write_atomic(path, &json)
    }

    /// Reads and checks an index written by [`ShardIndex::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let index: ShardIndex = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        index
            .validate()
            .map_err(|m| Error::Data(format!("shard index {}: {m}", path.display())))?;
        Ok(index)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.version != INDEX_VERSION {
            return Err(format!(
                "version {}, expected {INDEX_VERSION}",
                self.version
            ));
        }
        let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        for (i, f) in self.files.iter().enumerate() {
            if !is_hex(&f.sha256) {
                return Err(format!("files[{i}].sha256 is not 64 hex digits"));
            }
        }
        for (i, s) in self.shards.iter().enumerate() {
            if s.id as usize != i {
                return Err(format!("shards[{i}] has id {}, expected {i}", s.id));
            }
            if s.documents < 2 {
                return Err(format!(
                    "shard {i} holds {} document(s), expected ≥ 2",
                    s.documents
                ));
            }
            if !is_hex(&s.sha256) {
                return Err(format!("shard {i}: sha256 is not 64 hex digits"));
            }
            let mut total = 0u64;
            for r in &s.ranges {
                let Some(f) = self.files.get(r.file as usize) else {
                    return Err(format!("shard {i}: file index {} out of range", r.file));
                };
                if r.start > r.end || r.end > f.size || r.first_line == 0 {
                    return Err(format!(
                        "shard {i}: range {}..{} (line {}) invalid for {} ({} bytes)",
                        r.start,
                        r.end,
                        r.first_line,
                        f.path.display(),
                        f.size
                    ));
                }
                total = total
                    .checked_add(r.end - r.start)
                    .ok_or_else(|| format!("shard {i}: its ranges hold more than 2^64 bytes"))?;
            }
            if total != s.bytes {
                return Err(format!(
                    "shard {i}: ranges hold {total} bytes, `bytes` says {}",
                    s.bytes
                ));
            }
        }
        Ok(())
    }

    /// The spec of shard `id`.
    pub fn shard(&self, id: u32) -> Result<&ShardSpec> {
        self.shards.get(id as usize).ok_or_else(|| Error::Shard {
            id,
            msg: format!("no such shard (the index has {})", self.shards.len()),
        })
    }

    /// Total documents over all shards.
    pub fn total_documents(&self) -> u64 {
        self.shards.iter().map(|s| s.documents).sum()
    }

    /// Whether the index was built from exactly these resolved files (as
    /// [`resolve_inputs`] gives them) with this target size: if so, and
    /// [`ShardIndex::verify_unchanged`] passes, it can be reused.
    pub fn same_inputs(&self, files: &[PathBuf], target_shard_bytes: u64) -> bool {
        self.target_shard_bytes == target_shard_bytes
            && self.files.len() == files.len()
            && self.files.iter().zip(files).all(|(f, p)| &f.path == p)
    }

    /// Checks that every corpus file still has its indexed size and SHA-256.
    pub fn verify_unchanged(&self) -> Result<()> {
        for f in &self.files {
            let changed = |what: String| {
                Error::Data(format!(
                    "corpus file {} changed since the index was built: {what}",
                    f.path.display()
                ))
            };
            let meta = std::fs::metadata(&f.path).map_err(|e| Error::io(&f.path, e))?;
            if meta.len() != f.size {
                return Err(changed(format!("{} bytes, indexed {}", meta.len(), f.size)));
            }
            let mut h = Sha256::new();
            let mut file = File::open(&f.path).map_err(|e| Error::io(&f.path, e))?;
            std::io::copy(&mut file, &mut h).map_err(|e| Error::io(&f.path, e))?;
            let sum = hex(h.finalize());
            if sum != f.sha256 {
                return Err(changed(format!("SHA-256 {sum}, indexed {}", f.sha256)));
            }
        }
        Ok(())
    }

    /// The bytes of shard `id` (what the coordinator serves), checksum verified.
    pub fn read_shard(&self, id: u32) -> Result<Vec<u8>> {
        let spec = self.shard(id)?;
        // `bytes` is the index's claim; the files' real lengths are checked as they are read.
        let mut out = Vec::with_capacity(spec.bytes.min(64 << 20) as usize);
        for r in &spec.ranges {
            let f = self
                .files
                .get(r.file as usize)
                .ok_or_else(|| Error::Shard {
                    id,
                    msg: format!("file index {} out of range", r.file),
                })?;
            let mut file = File::open(&f.path).map_err(|e| Error::io(&f.path, e))?;
            file.seek(SeekFrom::Start(r.start))
                .map_err(|e| Error::io(&f.path, e))?;
            let n = file
                .take(r.end - r.start)
                .read_to_end(&mut out)
                .map_err(|e| Error::io(&f.path, e))?;
            if n as u64 != r.end - r.start {
                return Err(Error::Shard {
                    id,
                    msg: format!(
                        "{} is shorter than indexed (wanted bytes {}..{})",
                        f.path.display(),
                        r.start,
                        r.end
                    ),
                });
            }
        }
        verify_shard_bytes(spec, &out)?;
        Ok(out)
    }

    /// Parses bytes of shard `id` (e.g. fetched from the coordinator) into its documents.
    pub fn parse_shard(&self, id: u32, bytes: &[u8]) -> Result<Vec<Document>> {
        parse_shard(&self.files, self.shard(id)?, bytes, &self.options)
    }

    /// Reads and parses shard `id` from the local corpus.
    pub fn shard_documents(&self, id: u32) -> Result<Vec<Document>> {
        let bytes = self.read_shard(id)?;
        self.parse_shard(id, &bytes)
    }
}

/// Checks a shard's bytes against its spec (length and SHA-256).
pub fn verify_shard_bytes(spec: &ShardSpec, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != spec.bytes {
        return Err(Error::Shard {
            id: spec.id,
            msg: format!("{} bytes, expected {}", bytes.len(), spec.bytes),
        });
    }
    let sum = hex(Sha256::digest(bytes));
    if sum != spec.sha256 {
        return Err(Error::Shard {
            id: spec.id,
            msg: format!("checksum mismatch: SHA-256 {sum}, expected {}", spec.sha256),
        });
    }
    Ok(())
}

/// Parses a shard's (verified) bytes into documents: each range with its file's format, line
/// numbers as in the file. Fails if the document count differs from the index's.
pub fn parse_shard(
    files: &[CorpusFile],
    spec: &ShardSpec,
    bytes: &[u8],
    opts: &CorpusOptions,
) -> Result<Vec<Document>> {
    verify_shard_bytes(spec, bytes)?;
    // The spec may come from outside (an assignment): no count or range is taken on trust.
    let mut docs = Vec::with_capacity(spec.documents.min(bytes.len() as u64) as usize);
    let mut stats = ParseStats::default();
    let mut at = 0usize;
    for r in &spec.ranges {
        let f = files.get(r.file as usize).ok_or_else(|| Error::Shard {
            id: spec.id,
            msg: format!("file index {} out of range", r.file),
        })?;
        let piece = (r.end.checked_sub(r.start))
            .and_then(|len| at.checked_add(usize::try_from(len).ok()?))
            .and_then(|end| bytes.get(at..end))
            .ok_or_else(|| Error::Shard {
                id: spec.id,
                msg: format!(
                    "range {}..{} of file {} does not fit the shard's {} bytes",
                    r.start,
                    r.end,
                    r.file,
                    bytes.len()
                ),
            })?;
        at += piece.len();
        let origin = f.path.display().to_string();
        docs.extend(crate::data::corpus::parse_piece(
            piece,
            f.format,
            opts,
            &origin,
            r.first_line,
            &mut stats,
        )?);
    }
    if docs.len() as u64 != spec.documents {
        return Err(Error::Shard {
            id: spec.id,
            msg: format!(
                "parsed {} documents, the index says {} (different corpus options?)",
                docs.len(),
                spec.documents
            ),
        });
    }
    Ok(docs)
}

/// One epoch's shards: every shard once in an order shuffled by (seed, epoch) — the same for
/// any world size — and that order cut into `world_size` contiguous runs of about equal bytes.
/// A run is which shards a rank tokenizes at the epoch's start to count their instances; what
/// it then trains on is a contiguous range of the epoch's instances, balanced by those counts
/// (`data::epoch`), which mostly covers the same shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPlan {
    /// The seed that shuffled the order.
    pub seed: u64,
    /// The epoch it plans.
    pub epoch: u64,
    /// Shard ids in reading order.
    pub order: Vec<u32>,
    /// Each rank's run: positions in `order`.
    pub per_rank: Vec<std::ops::Range<usize>>,
    /// Bytes in each rank's run.
    pub rank_bytes: Vec<u64>,
}

impl EpochPlan {
    /// The shard ids of `rank`'s run, in order.
    pub fn run(&self, rank: usize) -> &[u32] {
        &self.order[self.per_rank[rank].clone()]
    }
}

/// Plans an epoch (`world_size` must be ≥ 1). Each cut is the shard boundary nearest to its
/// ideal byte offset, so every run's bytes are within one shard's bytes of the mean.
pub fn plan_epoch(index: &ShardIndex, seed: u64, epoch: u64, world_size: usize) -> EpochPlan {
    assert!(world_size > 0, "plan_epoch: world size must be at least 1");
    let mut order: Vec<u32> = (0..index.shards.len() as u32).collect();
    order.shuffle(&mut crate::util::rng(&[seed, epoch, PLAN_STREAM]));
    // prefix[i]: bytes of the first i shards of the order.
    let mut prefix = Vec::with_capacity(order.len() + 1);
    prefix.push(0u64);
    for &id in &order {
        prefix.push(prefix.last().unwrap() + index.shards[id as usize].bytes);
    }
    let total = *prefix.last().unwrap() as u128;
    let mut cuts = vec![0usize];
    for r in 1..world_size {
        let ideal = total * r as u128 / world_size as u128;
        // First boundary at or past the ideal offset, or the one before it if that is nearer.
        let mut i = prefix.partition_point(|&b| (b as u128) < ideal);
        if i > 0 && i < prefix.len() && ideal - (prefix[i - 1] as u128) < prefix[i] as u128 - ideal
        {
            i -= 1;
        }
        let i = i.clamp(*cuts.last().unwrap(), order.len());
        cuts.push(i);
    }
    cuts.push(order.len());
    let per_rank: Vec<_> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
    let rank_bytes = per_rank
        .iter()
        .map(|r| prefix[r.end] - prefix[r.start])
        .collect();
    EpochPlan {
        seed,
        epoch,
        order,
        per_rank,
        rank_bytes,
    }
}

/// Separates the plan's random stream from others drawn from the same (seed, epoch).
const PLAN_STREAM: u64 = 0x504c_414e; // "PLAN"
