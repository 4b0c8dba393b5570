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
use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, Model, Normalizer, NormalizerWrapper, OffsetReferential, OffsetType,
    PreTokenizedString, PreTokenizer, TokenizerImpl,
};

use crate::data::corpus::{resolve_inputs, CorpusOptions, Document, DocumentReader};
use crate::data::tokenizer_config::{HfTokenizerConfig, SpecialNames};
use crate::error::{Error, Result};

pub use crate::data::tokenizer_config::SPECIAL_TOKENS;

/// Ids of the special tokens in a vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Specials {
    /// The padding token, `[PAD]`.
    pub pad: u32,
    /// The unknown-word token, `[UNK]`.
    pub unk: u32,
    /// The sequence-start token, `[CLS]`.
    pub cls: u32,
    /// The segment separator, `[SEP]`.
    pub sep: u32,
    /// The MLM mask token, `[MASK]`.
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

    pub(crate) fn ids(&self) -> [u32; 5] {
        [self.pad, self.unk, self.cls, self.sep, self.mask]
    }

    /// Whether `id` is one of the special tokens.
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
    model_max_length: Option<usize>,
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

/// `tokenizers::Tokenizer::from_bytes`, with the JSON's syntax checked first: tokenizers 0.23
/// panics on a syntax error inside `"decoder"` (an `expect` in its deserialiser).
fn hf_from_bytes(bytes: &[u8], origin: &str) -> Result<tokenizers::Tokenizer> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| tok_err(origin, e))?;
    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| tok_err(origin, e))
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

/// BERT's `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B:1 [SEP]:1`, with the vocabulary's ids.
fn bert_template(
    names: &SpecialNames,
    id: impl Fn(&str) -> Option<u32>,
    origin: &str,
) -> Result<TemplateProcessing> {
    let lookup = |t: &str| {
        id(t).ok_or_else(|| {
            tok_err(
                origin,
                format!("the vocabulary lacks the special token {t}"),
            )
        })
    };
    let (cls, sep) = (names.cls(), names.sep());
    TemplateProcessing::builder()
        .try_single(format!("{cls} $A {sep}"))
        .and_then(|b| b.try_pair(format!("{cls} $A {sep} $B:1 {sep}:1")))
        .map_err(|e| tok_err(origin, e))?
        .special_tokens(vec![(cls, lookup(cls)?), (sep, lookup(sep)?)])
        .build()
        .map_err(|e| tok_err(origin, e))
}

/// Sets BERT's post-processor and registers the specials of a vocabulary tandem trained.
fn finish_pipeline(mut tk: BertImpl, origin: &str) -> Result<Tokenizer> {
    let names = SpecialNames::default();
    let post = bert_template(&names, |t| tk.token_to_id(t), origin)?;
    tk.with_post_processor(Some(post));
    let mut inner: tokenizers::Tokenizer = tk.into();
    register_specials(&mut inner, &names, origin)?;
    Tokenizer::from_hf(inner, origin)
}

/// The ids must be `0..vocab_size`, each once: an id past the size has no embedding row, and
/// of two tokens sharing an id the JSON the coordinator sends its workers keeps only one.
fn check_ids(inner: &tokenizers::Tokenizer, origin: &str) -> Result<()> {
    let mut vocab: Vec<(u32, String)> = (inner.get_vocab(true).into_iter())
        .map(|(t, id)| (id, t))
        .collect();
    vocab.sort_unstable();
    let Some((i, (id, t))) = (vocab.iter().enumerate()).find(|(i, (id, _))| *id as usize != *i)
    else {
        return Ok(());
    };
    let msg = match i.checked_sub(1).map(|p| &vocab[p]) {
        Some((prev, p)) if prev == id => format!("tokens {p:?} and {t:?} share the id {id}"),
        _ => format!(
            "no token has the id {i} (the next, {t:?}, has {id}): ids must run from 0 to one \
             less than the vocabulary's {} tokens",
            vocab.len()
        ),
    };
    Err(tok_err(origin, msg))
}

/// Marks the special tokens the vocabulary has as special (never split or normalised).
fn register_specials(
    inner: &mut tokenizers::Tokenizer,
    names: &SpecialNames,
    origin: &str,
) -> Result<()> {
    let present: Vec<AddedToken> = (names.0.iter())
        .filter(|t| inner.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    inner
        .add_special_tokens(present)
        .map_err(|e| tok_err(origin, e))?;
    Ok(())
}

/// Rebuilds a `tokenizer.json`'s pipeline as transformers' `BertTokenizer` does (see
/// [`crate::data::tokenizer_config`]): its WordPiece vocabulary and added tokens stay.
fn as_bert_tokenizer(
    inner: &mut tokenizers::Tokenizer,
    cfg: &HfTokenizerConfig,
    origin: &str,
) -> Result<()> {
    let ModelWrapper::WordPiece(wp) = inner.get_model() else {
        return Err(tok_err(
            origin,
            format!(
                "{} names a BERT tokenizer, but tokenizer.json's model is not WordPiece",
                cfg.origin()
            ),
        ));
    };
    let model = WordPiece::builder()
        .vocab(
            wp.get_vocab()
                .into_iter()
                .collect::<ahash::AHashMap<_, _>>(),
        )
        .unk_token(cfg.names.unk().into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| tok_err(origin, e))?;
    inner.with_model(model);
    inner
        .with_normalizer(Some(BertNormalizer::new(
            true,
            cfg.tokenize_chinese_chars,
            cfg.strip_accents,
            cfg.do_lower_case,
        )))
        .map_err(|e| tok_err(origin, e))?;
    inner.with_pre_tokenizer(Some(BertPreTokenizer));
    let post = bert_template(&cfg.names, |t| inner.token_to_id(t), origin)?;
    inner.with_post_processor(Some(post));
    inner.with_decoder(Some(WordPieceDecoder::default()));
    Ok(())
}

/// Adds `added_tokens_decoder`'s tokens (special ones as special), refusing one whose id
/// differs from the id the config gives it.
fn add_config_tokens(
    inner: &mut tokenizers::Tokenizer,
    cfg: &HfTokenizerConfig,
    origin: &str,
) -> Result<()> {
    for (id, t) in &cfg.added {
        let r = if t.special {
            inner.add_special_tokens([t.clone()])
        } else {
            inner.add_tokens([t.clone()])
        };
        r.map_err(|e| tok_err(origin, e))?;
        let got = inner.token_to_id(&t.content);
        if got != Some(*id) {
            return Err(tok_err(
                origin,
                format!(
                    "{}: added token {:?} has id {id} there but {got:?} in the vocabulary",
                    cfg.origin(),
                    t.content
                ),
            ));
        }
    }
    Ok(())
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
    /// Wraps an HF tokenizer as it is, with BERT's special-token names. Its own padding and
    /// truncation are turned off, as transformers does: tandem pads and cuts by itself.
    pub fn from_hf(inner: tokenizers::Tokenizer, origin: &str) -> Result<Self> {
        Self::with_names(inner, &SpecialNames::default(), None, origin)
    }

    fn with_names(
        mut inner: tokenizers::Tokenizer,
        names: &SpecialNames,
        config: Option<&HfTokenizerConfig>,
        origin: &str,
    ) -> Result<Self> {
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tok_err(origin, e))?;
        check_ids(&inner, origin)?;
        let mut ids = [0u32; 5];
        for (slot, (key, t)) in ids.iter_mut().zip(names.keyed()) {
            *slot = inner.token_to_id(t).ok_or_else(|| {
                let named = match config.and_then(|c| c.path.as_ref()) {
                    Some(p) => format!(" ({key} in {})", p.display()),
                    None => String::new(),
                };
                tok_err(
                    origin,
                    format!("the vocabulary lacks the special token {t}{named}"),
                )
            })?;
        }
        let [pad, unk, cls, sep, mask] = ids;
        Ok(Tokenizer {
            inner,
            specials: Specials {
                pad,
                unk,
                cls,
                sep,
                mask,
            },
            origin: origin.to_string(),
            model_max_length: config.and_then(|c| c.model_max_length),
        })
    }

    /// The HF `tokenizer.json` text (what the coordinator sends to workers). Workers read it
    /// with BERT's special-token names ([`Tokenizer::from_json`]): a tokenizer whose config
    /// names other tokens, which would get other ids there, is refused.
    pub fn to_json(&self) -> Result<String> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| tok_err(&self.origin, e))?;
        let theirs = Self::from_json(&json).map(|t| t.specials);
        if theirs.as_ref().ok() != Some(&self.specials) {
            let name = |id: u32| self.inner.id_to_token(id).unwrap_or_default();
            let ours: Vec<String> = self.specials.ids().map(name).into();
            return Err(tok_err(
                &self.origin,
                format!(
                    "the special tokens are {ours:?} (from tokenizer_config.json), but workers \
                     resolve {SPECIAL_TOKENS:?} ({}): training needs a tokenizer with BERT's \
                     special-token names",
                    match theirs {
                        Ok(s) => format!("ids {:?}, not {:?}", s.ids(), self.specials.ids()),
                        Err(e) => e.to_string(),
                    }
                ),
            ));
        }
        Ok(json)
    }

    /// Parses HF `tokenizer.json` text, as [`Tokenizer::to_json`] wrote it.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = hf_from_bytes(json.as_bytes(), "tokenizer.json text")?;
        Self::from_hf(inner, "tokenizer.json text")
    }

    /// Loads a directory holding `tokenizer.json` (preferred) or `vocab.txt`, or either file,
    /// as transformers' `AutoTokenizer` does: the file's padding and truncation are off, and
    /// a BERT tokenizer's pipeline, special tokens and added tokens follow the
    /// `tokenizer_config.json` beside it (see [`crate::data::tokenizer_config`]).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, None)
    }

    /// As [`Tokenizer::load`]; `lowercase` (if given) overrides `do_lower_case`.
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
        let dir = file.parent().unwrap_or(Path::new("."));
        let mut cfg = HfTokenizerConfig::in_dir(dir)?;
        if let Some(l) = lowercase {
            cfg.do_lower_case = l;
        }
        let is_json = file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let mut inner = if is_json {
            let mut inner = hf_from_bytes(&bytes, &origin)?;
            if cfg.bert || lowercase.is_some() {
                as_bert_tokenizer(&mut inner, &cfg, &origin)?;
            }
            inner
        } else {
            let vocab = WordPiece::read_bytes(&bytes).map_err(|e| tok_err(&origin, e))?;
            let model = WordPiece::builder()
                .vocab(vocab)
                .unk_token(cfg.names.unk().into())
                .continuing_subword_prefix("##".into())
                .build()
                .map_err(|e| tok_err(&origin, e))?;
            let mut inner: tokenizers::Tokenizer = BertImpl::new(model).into();
            as_bert_tokenizer(&mut inner, &cfg, &origin)?;
            register_specials(&mut inner, &cfg.names, &origin)?;
            inner
        };
        add_config_tokens(&mut inner, &cfg, &origin)?;
        let names = if cfg.bert || !is_json {
            cfg.names.clone()
        } else {
            SpecialNames::default()
        };
        Self::with_names(inner, &names, Some(&cfg), &origin)
    }

    /// The longest input the tokenizer's config declares (`model_max_length`), if any.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Warns when `key` asks for sequences longer than `model_max_length`: the model takes
    /// them (its positions are the hard limit, checked where it is known) but was published
    /// for shorter ones, as transformers warns too.
    pub fn warn_beyond_max_length(&self, len: usize, key: &str) {
        if let Some(m) = self.model_max_length.filter(|m| len > *m) {
            tracing::warn!(
                "{key} {len} exceeds the tokenizer's model_max_length {m} \
                 (tokenizer_config.json): the model was made for sequences up to {m} tokens"
            );
        }
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
        let (lower, strip, chinese) = match self.inner.get_normalizer() {
            Some(NormalizerWrapper::BertNormalizer(n)) => {
                (n.lowercase, n.strip_accents, n.handle_chinese_chars)
            }
            _ => (false, None, true),
        };
        // The special tokens by the names this vocabulary gives them, so transformers (and
        // tandem, which reads this file back) resolve the same ids.
        let name = |id: u32| self.inner.id_to_token(id).unwrap_or_default();
        let s = self.specials;
        let mut config = serde_json::json!({
            "do_lower_case": lower,
            "strip_accents": strip,
            "tokenize_chinese_chars": chinese,
            "tokenizer_class": "BertTokenizer",
            "unk_token": name(s.unk),
            "sep_token": name(s.sep),
            "pad_token": name(s.pad),
            "cls_token": name(s.cls),
            "mask_token": name(s.mask),
        });
        if let Some(m) = self.model_max_length {
            config["model_max_length"] = m.into();
        }
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

    /// The piece with id `id`, if the vocabulary has one.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of piece `token`, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The special tokens' ids.
    pub fn specials(&self) -> Specials {
        self.specials
    }

    /// The id of `[PAD]`.
    pub fn pad_id(&self) -> u32 {
        self.specials.pad
    }

    /// The id of `[UNK]`.
    pub fn unk_id(&self) -> u32 {
        self.specials.unk
    }

    /// The id of `[CLS]`.
    pub fn cls_id(&self) -> u32 {
        self.specials.cls
    }

    /// The id of `[SEP]`.
    pub fn sep_id(&self) -> u32 {
        self.specials.sep
    }

    /// The id of `[MASK]`.
    pub fn mask_id(&self) -> u32 {
        self.specials.mask
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
