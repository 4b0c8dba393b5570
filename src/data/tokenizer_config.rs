//! What transformers takes from `tokenizer_config.json` (and `config.json`) when it loads a
//! BERT tokenizer directory, so that tandem tokenizes a published checkpoint's text as
//! transformers does.
//!
//! transformers 5's `BertTokenizer` (also `BertTokenizerFast`, and the class `AutoTokenizer`
//! picks for `model_type = "bert"`) keeps the WordPiece vocabulary and added tokens of a
//! `tokenizer.json` but rebuilds the rest from this config: `BertNormalizer(lowercase =
//! do_lower_case (default true), strip_accents, handle_chinese_chars =
//! tokenize_chinese_chars)`, `BertPreTokenizer`, `[CLS] $A [SEP] $B:1 [SEP]:1`; and it turns
//! off the file's own `padding` and `truncation`. Another tokenizer class keeps the file's
//! pipeline as it is.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// The config keys of the special tokens, in [`crate::data::tokenizer::Specials`] order.
pub(crate) const SPECIAL_KEYS: [&str; 5] = [
    "pad_token",
    "unk_token",
    "cls_token",
    "sep_token",
    "mask_token",
];

/// Special-token names in [`SPECIAL_KEYS`] order, BERT's unless the config names others.
/// The special tokens, in the id order a trained vocabulary gives them (0..=4).
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpecialNames(pub [String; 5]);

impl Default for SpecialNames {
    fn default() -> Self {
        SpecialNames(SPECIAL_TOKENS.map(str::to_string))
    }
}

impl SpecialNames {
    pub fn unk(&self) -> &str {
        &self.0[1]
    }
    pub fn cls(&self) -> &str {
        &self.0[2]
    }
    pub fn sep(&self) -> &str {
        &self.0[3]
    }

    /// (config key, token) pairs.
    pub fn keyed(&self) -> impl Iterator<Item = (&'static str, &str)> {
        SPECIAL_KEYS
            .into_iter()
            .zip(self.0.iter().map(String::as_str))
    }
}

/// The settings transformers applies at load.
#[derive(Clone, Debug)]
pub(crate) struct HfTokenizerConfig {
    /// The file read, if any (for error messages).
    pub path: Option<PathBuf>,
    /// transformers builds BERT's pipeline from this config (a BERT tokenizer class).
    pub bert: bool,
    pub do_lower_case: bool,
    pub strip_accents: Option<bool>,
    pub tokenize_chinese_chars: bool,
    pub names: SpecialNames,
    /// `model_max_length`, when it is a real limit (transformers writes ~1e30 for "none").
    pub model_max_length: Option<usize>,
    /// `added_tokens_decoder`: id and token.
    pub added: Vec<(u32, AddedToken)>,
}

impl HfTokenizerConfig {
    /// The config in a tokenizer's directory. Without a `tokenizer_class`, a `config.json`
    /// with a BERT `model_type` makes transformers pick `BertTokenizer`; with neither, a
    /// `tokenizer.json` is used as it is (as `PreTrainedTokenizerFast` would).
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let mut cfg = HfTokenizerConfig {
            path: None,
            bert: model_type_is_bert(dir)?,
            do_lower_case: true,
            strip_accents: None,
            tokenize_chinese_chars: true,
            names: SpecialNames::default(),
            model_max_length: None,
            added: Vec::new(),
        };
        if !path.is_file() {
            return Ok(cfg);
        }
        let v = read_json(&path)?;
        let bad = |key: &str, want: &str| Error::Tokenizer {
            origin: path.display().to_string(),
            msg: format!("`{key}`: expected {want}, found {}", v[key]),
        };
        cfg.bert = match v.get("tokenizer_class") {
            None | Some(Value::Null) => cfg.bert,
            Some(Value::String(c)) => c.contains("Bert"),
            Some(_) => return Err(bad("tokenizer_class", "a class name")),
        };
        let flag = |key: &str| match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad(key, "true, false or null")),
        };
        cfg.do_lower_case = flag("do_lower_case")?.unwrap_or(true);
        cfg.strip_accents = flag("strip_accents")?;
        cfg.tokenize_chinese_chars = flag("tokenize_chinese_chars")?.unwrap_or(true);
        for (key, slot) in SPECIAL_KEYS.into_iter().zip(cfg.names.0.iter_mut()) {
            match v.get(key) {
                None | Some(Value::Null) => {}
                Some(t) => *slot = token_content(t).ok_or_else(|| bad(key, "a token"))?,
            }
        }
        cfg.model_max_length = match v.get("model_max_length") {
            None | Some(Value::Null) => None,
            Some(n) => {
                let n = n
                    .as_f64()
                    .ok_or_else(|| bad("model_max_length", "a number"))?;
                (1.0..1e12).contains(&n).then_some(n as usize)
            }
        };
        if let Some(map) = v.get("added_tokens_decoder").and_then(Value::as_object) {
            for (id, t) in map {
                let id: u32 = id
                    .parse()
                    .map_err(|_| bad("added_tokens_decoder", "token ids as keys"))?;
                let t = added_token(t)
                    .ok_or_else(|| bad("added_tokens_decoder", "tokens with a `content`"))?;
                cfg.added.push((id, t));
            }
            cfg.added.sort_by_key(|(id, _)| *id);
        }
        cfg.path = Some(path);
        Ok(cfg)
    }

    /// Where the settings came from, for messages.
    pub fn origin(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "transformers' BertTokenizer defaults".into(),
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// `config.json`'s `model_type` names a BERT model (bert, distilbert, …).
fn model_type_is_bert(dir: &Path) -> Result<bool> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(false);
    }
    let v = read_json(&path)?;
    Ok(v["model_type"].as_str().is_some_and(|t| t.contains("bert")))
}

/// A token as transformers writes it: a string, or an object with `content`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn added_token(v: &Value) -> Option<AddedToken> {
    let content = token_content(v)?;
    let flag = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
    let special = flag("special", false);
    Some(AddedToken {
        content,
        single_word: flag("single_word", false),
        lstrip: flag("lstrip", false),
        rstrip: flag("rstrip", false),
        normalized: flag("normalized", !special),
        special,
    })
}
