//! Pre-training instances (NSP pairs with MLM masking) from a shard's tokenized documents.
//!
//! Follows google-research/bert `create_pretraining_data.py`
//! (<https://github.com/google-research/bert/blob/master/create_pretraining_data.py>):
//! `create_instances_from_document`, `truncate_seq_pair`, `create_masked_lm_predictions`,
//! with one RNG per (seed, epoch, shard), so a shard yields the same instances on any rank and
//! instance `k` of a shard is a stable resume point. Deliberate differences, each marked `Ours:`
//! below: the random B comes from another document of the same shard; a one-segment chunk
//! that draws IsNext is split inside the segment (the original forces NotNext there, which
//! pushes IsNext under 50%); the number of masks is 15% of the *maskable* tokens (not of the
//! sequence with its specials); no special token is ever masked or drawn as a random token;
//! whole-word masking only joins `##` pieces to the word right before them.

use std::path::PathBuf;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::batch::{PretrainBatch, IGNORE};
use crate::data::corpus::CorpusOptions;
use crate::data::shard::build_index;
use crate::data::tokenizer::{Specials, Tokenizer};
use crate::error::{Error, Result};

/// How instances are made (google-research/bert's flags of the same names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceOptions {
    /// Longest instance in tokens, `[CLS]` and both `[SEP]` included (≥ 5).
    pub max_seq_length: usize,
    /// Probability of aiming at a random shorter length (2..=max_seq_length-3).
    pub short_seq_prob: f64,
    /// Fraction of maskable tokens chosen for MLM.
    pub masked_lm_prob: f64,
    /// Cap on the number of masked positions per instance.
    pub max_predictions_per_seq: usize,
    /// Mask whole words: `##` pieces are chosen together with the piece before them.
    pub whole_word_mask: bool,
    /// Pad every training batch to `max_seq_length` (static shapes, equal work on every rank)
    /// instead of to its longest instance (less work on short text, but ranks whose batches
    /// happen to be longer make the others wait at each all-reduce).
    pub pad_to_max_length: bool,
}

impl Default for InstanceOptions {
    fn default() -> Self {
        InstanceOptions {
            max_seq_length: 128,
            short_seq_prob: 0.1,
            masked_lm_prob: 0.15,
            max_predictions_per_seq: 20,
            whole_word_mask: false,
            pad_to_max_length: false,
        }
    }
}

impl InstanceOptions {
    /// Checks `max_seq_length` and the probabilities; the error names the offending option.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Data(format!("instance options: {m}")));
        if self.max_seq_length < 5 {
            return bad(format!(
                "max_seq_length = {}, expected ≥ 5",
                self.max_seq_length
            ));
        }
        for (name, p) in [
            ("short_seq_prob", self.short_seq_prob),
            ("masked_lm_prob", self.masked_lm_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} = {p}, expected a probability in [0, 1]"));
            }
        }
        Ok(())
    }
}

/// What masking needs to know about the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabInfo {
    /// The special tokens' ids.
    pub specials: Specials,
    /// Vocabulary size (ids are `0..size`).
    pub size: usize,
    /// Per id: the piece continues a word (`##…`). Empty: whole-word masking has no effect.
    pub continues_word: Vec<bool>,
}

impl VocabInfo {
    /// Specials and size only (no whole-word information).
    pub fn new(specials: Specials, size: usize) -> Self {
        VocabInfo {
            specials,
            size,
            continues_word: Vec::new(),
        }
    }

    /// Specials, size and the word-continuation pieces (`##…`) of `t`'s vocabulary.
    pub fn from_tokenizer(t: &Tokenizer) -> Self {
        let size = t.vocab_size();
        let continues_word = (0..size as u32)
            .map(|id| t.id_to_token(id).is_some_and(|s| s.starts_with("##")))
            .collect();
        VocabInfo {
            specials: t.specials(),
            size,
            continues_word,
        }
    }
}

/// One pre-training example: `[CLS] A [SEP] B [SEP]`, unpadded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Token ids after masking.
    pub input_ids: Vec<u32>,
    /// 0 for `[CLS] A [SEP]`, 1 for `B [SEP]`.
    pub segment_ids: Vec<u32>,
    /// Original id at masked positions, [`IGNORE`] elsewhere; same length as `input_ids`.
    pub mlm_labels: Vec<i64>,
    /// B is a random segment from another document (NSP label 1 = NotNext).
    pub is_random_next: bool,
}

/// Separates the instances' random stream from others drawn from the same seed.
const INSTANCE_STREAM: u64 = 0x494e_5354; // "INST"

/// All instances of one shard for one epoch, in a deterministic shuffled order: the same
/// (documents, options, vocabulary, seed, epoch, shard id) give the same list everywhere.
pub fn instances_for_shard(
    docs: &[Vec<Vec<u32>>],
    opts: &InstanceOptions,
    vocab: &VocabInfo,
    seed: u64,
    epoch: u64,
    shard_id: u32,
) -> Vec<Instance> {
    let docs: Vec<Vec<&[u32]>> = docs
        .iter()
        .map(|d| {
            d.iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_slice())
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect();
    let mut rng = crate::util::rng(&[seed, epoch, shard_id as u64, INSTANCE_STREAM]);
    let mut out = Vec::new();
    for di in 0..docs.len() {
        from_document(&docs, di, opts, vocab, &mut rng, &mut out);
    }
    out.shuffle(&mut rng);
    out
}

/// `create_instances_from_document`.
fn from_document(
    docs: &[Vec<&[u32]>],
    di: usize,
    opts: &InstanceOptions,
    vocab: &VocabInfo,
    rng: &mut ChaCha8Rng,
    out: &mut Vec<Instance>,
) {
    let doc = &docs[di];
    let max_num_tokens = opts.max_seq_length.saturating_sub(3).max(2);
    let mut target = max_num_tokens;
    if rng.random::<f64>() < opts.short_seq_prob {
        target = rng.random_range(2..=max_num_tokens);
    }
    let mut chunk: Vec<&[u32]> = Vec::new();
    let mut chunk_len = 0;
    let mut i = 0;
    while i < doc.len() {
        chunk.push(doc[i]);
        chunk_len += doc[i].len();
        if i == doc.len() - 1 || chunk_len >= target {
            // `a_end` segments of the chunk go to A.
            let a_end = if chunk.len() >= 2 {
                rng.random_range(1..chunk.len())
            } else {
                1
            };
            let mut a: Vec<u32> = chunk[..a_end].concat();
            let mut b: Vec<u32> = Vec::new();
            let mut random_next = rng.random::<f64>() < 0.5;
            if !random_next && chunk.len() == 1 {
                // Ours: split the lone segment so IsNext stays at 50%.
                if a.len() >= 2 {
                    let k = rng.random_range(1..a.len());
                    b = a.split_off(k);
                } else {
                    random_next = true;
                }
            }
            if random_next {
                let target_b = target.saturating_sub(a.len()).max(1);
                // Ours: any other document of the shard, uniformly (one left: the same one).
                let ri = if docs.len() > 1 {
                    let r = rng.random_range(0..docs.len() - 1);
                    r + (r >= di) as usize
                } else {
                    di
                };
                let rdoc = &docs[ri];
                let start = rng.random_range(0..rdoc.len());
                for seg in &rdoc[start..] {
                    b.extend_from_slice(seg);
                    if b.len() >= target_b {
                        break;
                    }
                }
                // The segments not used for A go back to be read again.
                i -= chunk.len() - a_end;
            } else if chunk.len() >= 2 {
                b = chunk[a_end..].concat();
            }
            truncate_seq_pair(&mut a, &mut b, max_num_tokens, rng);
            let s = &vocab.specials;
            let mut input_ids = Vec::with_capacity(a.len() + b.len() + 3);
            input_ids.push(s.cls);
            input_ids.extend_from_slice(&a);
            input_ids.push(s.sep);
            let a_len = input_ids.len();
            input_ids.extend_from_slice(&b);
            input_ids.push(s.sep);
            let mut segment_ids = vec![0u32; input_ids.len()];
            segment_ids[a_len..].fill(1);
            let mlm_labels = mask_tokens(&mut input_ids, opts, vocab, rng);
            out.push(Instance {
                input_ids,
                segment_ids,
                mlm_labels,
                is_random_next: random_next,
            });
            chunk.clear();
            chunk_len = 0;
        }
        i += 1;
    }
}

/// `truncate_seq_pair`: drop tokens from the longer side, front or back at random, until
/// the pair fits.
fn truncate_seq_pair(
    a: &mut Vec<u32>,
    b: &mut Vec<u32>,
    max_num_tokens: usize,
    rng: &mut ChaCha8Rng,
) {
    let (mut a_lo, mut a_hi, mut b_lo, mut b_hi) = (0, a.len(), 0, b.len());
    while (a_hi - a_lo) + (b_hi - b_lo) > max_num_tokens {
        let a_longer = a_hi - a_lo > b_hi - b_lo;
        let front = rng.random::<f64>() < 0.5;
        match (a_longer, front) {
            (true, true) => a_lo += 1,
            (true, false) => a_hi -= 1,
            (false, true) => b_lo += 1,
            (false, false) => b_hi -= 1,
        }
    }
    a.truncate(a_hi);
    a.drain(..a_lo);
    b.truncate(b_hi);
    b.drain(..b_lo);
}

/// `create_masked_lm_predictions`: masks `tokens` in place and returns the labels.
fn mask_tokens(
    tokens: &mut [u32],
    opts: &InstanceOptions,
    vocab: &VocabInfo,
    rng: &mut ChaCha8Rng,
) -> Vec<i64> {
    let s = &vocab.specials;
    // Candidate words: runs of positions (whole words when asked).
    let mut cands: Vec<(usize, usize)> = Vec::new();
    let mut maskable = 0usize;
    for (i, &t) in tokens.iter().enumerate() {
        if s.contains(t) {
            continue;
        }
        maskable += 1;
        let joins = opts.whole_word_mask
            && vocab
                .continues_word
                .get(t as usize)
                .copied()
                .unwrap_or(false)
            && cands.last().is_some_and(|&(st, n)| st + n == i);
        match cands.last_mut() {
            Some(last) if joins => last.1 += 1,
            _ => cands.push((i, 1)),
        }
    }
    cands.shuffle(rng);
    let mut labels = vec![IGNORE; tokens.len()];
    if maskable == 0 || opts.masked_lm_prob <= 0.0 {
        return labels;
    }
    let wanted = ((maskable as f64 * opts.masked_lm_prob).round() as usize).max(1);
    let num_to_predict = wanted.min(opts.max_predictions_per_seq);
    let mut masked = 0;
    for (start, n) in cands {
        if masked >= num_to_predict {
            break;
        }
        if masked + n > num_to_predict {
            continue;
        }
        for idx in start..start + n {
            let original = tokens[idx];
            labels[idx] = original as i64;
            tokens[idx] = if rng.random::<f64>() < 0.8 {
                s.mask
            } else if rng.random::<f64>() < 0.5 {
                original
            } else {
                random_token(vocab, rng).unwrap_or(original)
            };
        }
        masked += n;
    }
    labels
}

/// A uniformly random non-special id (`None` if the vocabulary has none).
fn random_token(vocab: &VocabInfo, rng: &mut ChaCha8Rng) -> Option<u32> {
    let n = vocab.size as u32;
    if n as usize <= vocab.specials.ids().len() {
        return None;
    }
    // Rejection: specials are 5 of thousands of ids, so this rarely loops.
    (0..1000)
        .map(|_| rng.random_range(0..n))
        .find(|id| !vocab.specials.contains(*id))
}

/// Pads instances into a batch: to `pad_to` tokens, or to the longest instance.
pub fn collate(
    instances: &[Instance],
    pad_to: Option<usize>,
    pad_id: u32,
) -> Result<PretrainBatch> {
    let longest = instances
        .iter()
        .map(|i| i.input_ids.len())
        .max()
        .unwrap_or(0);
    if instances.is_empty() {
        return Err(Error::Batch("collate: no instances".into()));
    }
    let seq = pad_to.unwrap_or(longest);
    if longest > seq {
        return Err(Error::Batch(format!(
            "collate: an instance has {longest} tokens, more than pad_to = {seq}"
        )));
    }
    let n = instances.len() * seq;
    let mut b = PretrainBatch {
        batch: instances.len(),
        seq,
        input_ids: vec![pad_id; n],
        token_type_ids: vec![0; n],
        attention_mask: vec![0; n],
        mlm_labels: vec![IGNORE; n],
        nsp_labels: Vec::with_capacity(instances.len()),
    };
    for (r, inst) in instances.iter().enumerate() {
        let (o, len) = (r * seq, inst.input_ids.len());
        b.input_ids[o..o + len].copy_from_slice(&inst.input_ids);
        b.token_type_ids[o..o + len].copy_from_slice(&inst.segment_ids);
        b.attention_mask[o..o + len].fill(1);
        b.mlm_labels[o..o + len].copy_from_slice(&inst.mlm_labels);
        b.nsp_labels.push(inst.is_random_next as u32);
    }
    Ok(b)
}

/// Position in a rank's shard list: the next instance to read is instance `instance` of
/// shard `shard_id`. A checkpoint that stores it resumes exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The shard's id.
    pub shard_id: u32,
    /// Index of the next instance within the shard.
    pub instance: u64,
}

/// The instances of a rank's shards in plan order, from a cursor; one shard in memory.
pub struct InstanceStream<F> {
    shards: Vec<u32>,
    pos: usize,
    skip: u64,
    current: std::vec::IntoIter<Instance>,
    load: F,
    opts: InstanceOptions,
    vocab: VocabInfo,
    seed: u64,
    epoch: u64,
    failed: bool,
}

impl<F: FnMut(u32) -> Result<Vec<Vec<Vec<u32>>>>> InstanceStream<F> {
    /// `shards`: this rank's shards in order (from the epoch plan); `start`: where to resume
    /// (its shard must be in `shards`); `load`: a shard's tokenized documents.
    pub fn new(
        shards: Vec<u32>,
        start: Option<Cursor>,
        load: F,
        opts: InstanceOptions,
        vocab: VocabInfo,
        seed: u64,
        epoch: u64,
    ) -> Result<Self> {
        opts.validate()?;
        let (pos, skip) = match start {
            None => (0, 0),
            Some(c) => {
                let p = shards
                    .iter()
                    .position(|&s| s == c.shard_id)
                    .ok_or_else(|| {
                        Error::Data(format!(
                            "resume cursor names shard {}, not in this rank's plan",
                            c.shard_id
                        ))
                    })?;
                (p, c.instance)
            }
        };
        Ok(InstanceStream {
            shards,
            pos,
            skip,
            current: Vec::new().into_iter(),
            load,
            opts,
            vocab,
            seed,
            epoch,
            failed: false,
        })
    }

    /// Where the next instance comes from; `None` once every shard is read.
    pub fn position(&self) -> Option<Cursor> {
        let shard_id = *self.shards.get(self.pos)?;
        Some(Cursor {
            shard_id,
            instance: self.skip,
        })
    }

    fn step(&mut self) -> Result<Option<Instance>> {
        loop {
            if let Some(inst) = self.current.next() {
                self.skip += 1;
                if self.current.len() == 0 {
                    self.pos += 1;
                    self.skip = 0;
                }
                return Ok(Some(inst));
            }
            let Some(&id) = self.shards.get(self.pos) else {
                return Ok(None);
            };
            let docs = (self.load)(id)?;
            let all =
                instances_for_shard(&docs, &self.opts, &self.vocab, self.seed, self.epoch, id);
            if self.skip as usize > all.len() {
                return Err(Error::Data(format!(
                    "resume cursor: instance {} of shard {id}, which has {}",
                    self.skip,
                    all.len()
                )));
            }
            let mut it = all.into_iter();
            if self.skip > 0 {
                it.nth(self.skip as usize - 1);
            }
            if it.len() == 0 {
                self.pos += 1;
                self.skip = 0;
            }
            self.current = it;
        }
    }
}

impl<F: FnMut(u32) -> Result<Vec<Vec<Vec<u32>>>>> Iterator for InstanceStream<F> {
    type Item = Result<Instance>;

    fn next(&mut self) -> Option<Result<Instance>> {
        if self.failed {
            return None;
        }
        let r = self.step();
        self.failed = r.is_err();
        r.transpose()
    }
}

/// Settings of [`bench_data`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchDataOptions {
    /// How the corpus is parsed.
    pub corpus: CorpusOptions,
    /// Instance creation (sequence length, masking, NSP).
    pub instances: InstanceOptions,
    /// Target shard size in bytes.
    pub shard_bytes: u64,
    /// Instances per collated batch.
    pub batch_size: usize,
    /// Seed of the instances' sampling and masking.
    pub seed: u64,
}

impl Default for BenchDataOptions {
    fn default() -> Self {
        BenchDataOptions {
            corpus: CorpusOptions::default(),
            instances: InstanceOptions::default(),
            shard_bytes: 16 << 20,
            batch_size: 32,
            seed: 0,
        }
    }
}

/// Result of `tandem bench data`.
#[derive(Clone, Debug, Serialize)]
pub struct DataBench {
    /// Corpus bytes indexed.
    pub bytes: u64,
    /// Documents in the corpus.
    pub documents: u64,
    /// Shards cut.
    pub shards: usize,
    /// WordPiece tokens over all sentences.
    pub tokens: u64,
    /// Pre-training instances created.
    pub instances: u64,
    /// Masked (MLM-labelled) positions over all batches.
    pub masked: u64,
    /// Coordinator side: scanning, checksumming and cutting the corpus.
    pub index_secs: f64,
    /// Worker side: read + verify + parse + tokenize + instances + collate, one thread.
    pub secs: f64,
    /// Tokens per second of worker-side time (`secs`).
    pub tokens_per_s: f64,
    /// Instances per second of worker-side time (`secs`).
    pub instances_per_s: f64,
}

/// Runs the whole data pipeline over `files` on the calling thread and times it.
pub fn bench_data(
    files: &[PathBuf],
    tokenizer: &Tokenizer,
    opts: &BenchDataOptions,
) -> Result<DataBench> {
    opts.instances.validate()?;
    let t0 = Instant::now();
    let index = build_index(files, opts.shard_bytes, &opts.corpus)?;
    let index_secs = t0.elapsed().as_secs_f64();
    let vocab = VocabInfo::from_tokenizer(tokenizer);
    let (mut tokens, mut instances, mut masked) = (0u64, 0u64, 0u64);
    let t1 = Instant::now();
    for spec in &index.shards {
        let docs = index.shard_documents(spec.id)?;
        let ids = tokenizer.encode_documents(&docs)?;
        tokens += ids.iter().flatten().map(|s| s.len() as u64).sum::<u64>();
        let inst = instances_for_shard(&ids, &opts.instances, &vocab, opts.seed, 0, spec.id);
        for chunk in inst.chunks(opts.batch_size.max(1)) {
            let b = collate(
                chunk,
                Some(opts.instances.max_seq_length),
                vocab.specials.pad,
            )?;
            masked += b.mlm_count() as u64;
        }
        instances += inst.len() as u64;
    }
    let secs = t1.elapsed().as_secs_f64();
    Ok(DataBench {
        bytes: index.shards.iter().map(|s| s.bytes).sum(),
        documents: index.total_documents(),
        shards: index.shards.len(),
        tokens,
        instances,
        masked,
        index_secs,
        secs,
        tokens_per_s: tokens as f64 / secs.max(1e-9),
        instances_per_s: instances as f64 / secs.max(1e-9),
    })
}
