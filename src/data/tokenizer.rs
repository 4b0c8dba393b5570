//! BERT WordPiece tokenizer: training, loading (`tokenizer.json` or `vocab.txt`), saving in a
//! layout HF `BertTokenizerFast.from_pretrained(dir)` reads, and encoding.
//!
//! The pipeline is BERT's: `BertNormalizer` (clean text, split CJK ideographs, lowercase and
//! accent stripping per options), `BertPreTokenizer` (whitespace and punctuation), WordPiece
//! with the `##` prefix, and `[CLS] A [SEP] B [SEP]` as post-processor.
//!
//! Note for Hangul: accent stripping (implied by `lowercase` unless `strip_accents` says
//! otherwise) decomposes syllables into jamo (NFD), as HF and google-research/bert do. The
//! pieces are still known tokens, but `strip_accents = Some(false)` keeps whole syllables.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, Normalizer, NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, TokenizerImpl,
};

use crate::data::corpus::{resolve_inputs, CorpusOptions, Document, DocumentReader};
use crate::error::{Error, Result};

/// The special tokens, in the id order a trained vocabulary gives them (0..=4).
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Ids of the special tokens in a vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Specials {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl Specials {
    /// The layout of a vocabulary trained by [`train_wordpiece`].
    pub const TRAINED: Specials = Specials {
        pad: 0,
        unk: 1,
        cls: 2,
        sep: 3,
        mask: 4,
    };

    pub fn ids(&self) -> [u32; 5] {
        [self.pad, self.unk, self.cls, self.sep, self.mask]
    }

    pub fn contains(&self, id: u32) -> bool {
        self.ids().contains(&id)
    }
}

/// A BERT WordPiece tokenizer with its special-token ids resolved.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    specials: Specials,
    origin: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials)
            .finish()
    }
}

fn tok_err(origin: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        origin: origin.to_string(),
        msg: e.to_string(),
    }
}

type BertImpl = TokenizerImpl<
    WordPiece,
    BertNormalizer,
    BertPreTokenizer,
    TemplateProcessing,
    WordPieceDecoder,
>;

/// Configures the BERT pipeline around `model`; the post-processor uses the vocab's ids.
fn bert_pipeline(
    model: WordPiece,
    lowercase: bool,
    strip_accents: Option<bool>,
    origin: &str,
) -> Result<BertImpl> {
    let mut tk = BertImpl::new(model);
    tk.with_normalizer(Some(BertNormalizer::new(
        true,
        true,
        strip_accents,
        lowercase,
    )))
    .map_err(|e| tok_err(origin, e))?;
    tk.with_pre_tokenizer(Some(BertPreTokenizer));
    tk.with_decoder(Some(WordPieceDecoder::default()));
    Ok(tk)
}

/// Sets the `[CLS] $A [SEP] $B:1 [SEP]:1` post-processor and registers the specials.
fn finish_pipeline(mut tk: BertImpl, origin: &str) -> Result<Tokenizer> {
    let id = |t: &str| {
        tk.token_to_id(t).ok_or_else(|| Error::Tokenizer {
            origin: origin.to_string(),
            msg: format!("the vocabulary lacks the special token {t}"),
        })
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let post = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| tok_err(origin, e))?
        .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
        .build()
        .map_err(|e| tok_err(origin, e))?;
    tk.with_post_processor(Some(post));
    let present: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .filter(|t| tk.token_to_id(t).is_some())
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tk.add_special_tokens(present)
        .map_err(|e| tok_err(origin, e))?;
    Tokenizer::from_hf(tk.into(), origin)
}

/// Trains a WordPiece vocabulary of about `vocab_size` pieces on corpus files (text or JSONL,
/// as [`crate::data::corpus`] reads them; directories and globs are resolved). Specials get
/// ids 0..=4 in [`SPECIAL_TOKENS`] order. `strip_accents: None` follows `lowercase`.
pub fn train_wordpiece(
    files: &[PathBuf],
    vocab_size: usize,
    lowercase: bool,
    strip_accents: Option<bool>,
    min_frequency: u64,
) -> Result<Tokenizer> {
    let paths = resolve_inputs(files)?;
    let origin = format!("trained on {} file(s)", paths.len());
    let model = WordPiece::builder()
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| tok_err(&origin, e))?;
    let mut tk = bert_pipeline(model, lowercase, strip_accents, &origin)?;
    // Count words as the pipeline sees them (BERT normaliser + pre-tokeniser), then learn the
    // vocabulary deterministically (crate::data::vocab; HF's trainer breaks ties in hash-map
    // order, so its vocabularies differ from run to run).
    let mut words: std::collections::BTreeMap<String, u64> = Default::default();
    {
        let normalizer = tk.get_normalizer().expect("set by bert_pipeline");
        let pre = tk.get_pre_tokenizer().expect("set by bert_pipeline");
        for doc in DocumentReader::new(paths, CorpusOptions::default()) {
            for sentence in doc? {
                let mut p = PreTokenizedString::from(sentence.as_str());
                p.normalize(|n| normalizer.normalize(n))
                    .and_then(|_| pre.pre_tokenize(&mut p))
                    .map_err(|e| tok_err(&origin, e))?;
                for (w, _, _) in p.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                    if !w.is_empty() {
                        *words.entry(w.to_string()).or_default() += 1;
                    }
                }
            }
        }
    }
    let vocab = crate::data::vocab::learn(&words, vocab_size, min_frequency, &SPECIAL_TOKENS, "##");
    let map: ahash::AHashMap<String, u32> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let model = WordPiece::builder()
        .vocab(map)
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| tok_err(&origin, e))?;
    tk.with_model(model);
    let t = finish_pipeline(tk, &origin)?;
    if t.specials != Specials::TRAINED {
        return Err(tok_err(
            &origin,
            format!("special tokens got ids {:?}, expected 0..=4", t.specials),
        ));
    }
    Ok(t)
}

impl Tokenizer {
    /// Wraps an HF tokenizer, resolving the special tokens (an error names a missing one).
    pub fn from_hf(inner: tokenizers::Tokenizer, origin: &str) -> Result<Self> {
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| Error::Tokenizer {
                origin: origin.to_string(),
                msg: format!("the vocabulary lacks the special token {t}"),
            })
        };
        let specials = Specials {
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
        };
        Ok(Tokenizer {
            inner,
            specials,
            origin: origin.to_string(),
        })
    }

    /// The HF `tokenizer.json` text (what the coordinator sends to workers).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| tok_err(&self.origin, e))
    }

    /// Parses HF `tokenizer.json` text.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| tok_err("tokenizer.json text", e))?;
        Self::from_hf(inner, "tokenizer.json text")
    }

    /// Loads a directory holding `tokenizer.json` (preferred) or `vocab.txt`, or either file.
    /// A `vocab.txt` gets BERT's pipeline, lowercasing per a sibling `tokenizer_config.json`'s
    /// `do_lower_case` (default true, as HF's `BertTokenizer`) and its `strip_accents`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, None)
    }

    /// As [`Tokenizer::load`]; `lowercase` (if given) overrides `do_lower_case` for `vocab.txt`.
    pub fn load_with(path: &Path, lowercase: Option<bool>) -> Result<Self> {
        let file = if path.is_dir() {
            let json = path.join("tokenizer.json");
            let vocab = path.join("vocab.txt");
            if json.is_file() {
                json
            } else if vocab.is_file() {
                vocab
            } else {
                return Err(tok_err(
                    &path.display().to_string(),
                    "directory has neither tokenizer.json nor vocab.txt",
                ));
            }
        } else {
            path.to_path_buf()
        };
        let origin = file.display().to_string();
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let is_json = file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            let inner =
                tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(&origin, e))?;
            return Self::from_hf(inner, &origin);
        }
        let (config_lower, strip_accents) = read_tokenizer_config(&file)?;
        let lowercase = lowercase.or(config_lower).unwrap_or(true);
        let vocab = WordPiece::read_bytes(&bytes).map_err(|e| tok_err(&origin, e))?;
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .build()
            .map_err(|e| tok_err(&origin, e))?;
        let tk = bert_pipeline(model, lowercase, strip_accents, &origin)?;
        finish_pipeline(tk, &origin)
    }

    /// Writes `tokenizer.json`, `vocab.txt` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| tok_err(&self.origin, e))?;
        crate::util::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let mut vocab = String::new();
        for id in 0..self.vocab_size() as u32 {
            let t = self.inner.id_to_token(id).ok_or_else(|| {
                tok_err(
                    &self.origin,
                    format!("vocabulary ids are not contiguous: no token has id {id}"),
                )
            })?;
            vocab.push_str(&t);
            vocab.push('\n');
        }
        crate::util::write_atomic(&dir.join("vocab.txt"), vocab.as_bytes())?;
        let (lower, strip) = match self.inner.get_normalizer() {
            Some(NormalizerWrapper::BertNormalizer(n)) => (n.lowercase, n.strip_accents),
            _ => (false, None),
        };
        let config = serde_json::json!({
            "do_lower_case": lower,
            "strip_accents": strip,
            "tokenizer_class": "BertTokenizer",
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        });
        let text = serde_json::to_string_pretty(&config).map_err(|source| Error::Json {
            path: dir.join("tokenizer_config.json"),
            source,
        })?;
        crate::util::write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tok_err(&self.origin, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[CLS] text [SEP]`: ids and tokens.
    pub fn encode_with_specials(&self, text: &str) -> Result<(Vec<u32>, Vec<String>)> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| tok_err(&self.origin, e))?;
        Ok((enc.get_ids().to_vec(), enc.get_tokens().to_vec()))
    }

    /// Tokenizes documents sentence by sentence, dropping sentences (and then documents) that
    /// yield no token.
    pub fn encode_documents(&self, docs: &[Document]) -> Result<Vec<Vec<Vec<u32>>>> {
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            let mut d = Vec::with_capacity(doc.len());
            for s in doc {
                let ids = self.encode(s)?;
                if !ids.is_empty() {
                    d.push(ids);
                }
            }
            if !d.is_empty() {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn specials(&self) -> Specials {
        self.specials
    }

    pub fn pad_id(&self) -> u32 {
        self.specials.pad
    }

    pub fn unk_id(&self) -> u32 {
        self.specials.unk
    }

    pub fn cls_id(&self) -> u32 {
        self.specials.cls
    }

    pub fn sep_id(&self) -> u32 {
        self.specials.sep
    }

    pub fn mask_id(&self) -> u32 {
        self.specials.mask
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `do_lower_case` and `strip_accents` from a `tokenizer_config.json` beside `vocab`.
fn read_tokenizer_config(vocab: &Path) -> Result<(Option<bool>, Option<bool>)> {
    let Some(cfg) = vocab.parent().map(|d| d.join("tokenizer_config.json")) else {
        return Ok((None, None));
    };
    if !cfg.is_file() {
        return Ok((None, None));
    }
    let text = std::fs::read_to_string(&cfg).map_err(|e| Error::io(&cfg, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: cfg.clone(),
        source,
    })?;
    let flag = |k: &str| v.get(k).and_then(|b| b.as_bool());
    Ok((flag("do_lower_case"), flag("strip_accents")))
}
