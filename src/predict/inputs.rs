//! What `tandem predict` reads: JSONL records and the fine-tuning dataset formats.

use super::*;

/// One classification input: a text or a pair of texts.
#[derive(Clone, Debug, PartialEq)]
pub struct TextInput {
    /// The input's `id`, passed through to its output.
    pub id: Option<Value>,
    /// The text (or the pair's first text).
    pub text_a: String,
    /// The pair's second text; `None` for single texts.
    pub text_b: Option<String>,
}

/// One token-classification input: a raw text, or (CoNLL) words joined by single spaces.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenInput {
    /// The input's `id`, passed through to its output.
    pub id: Option<Value>,
    /// The text whose words are labelled.
    pub text: String,
    /// The given words (CoNLL input); `None` splits `text` as the tokenizer does.
    pub words: Option<Vec<String>>,
}

/// The inputs of one run, in order, as the head takes them.
#[derive(Clone, Debug)]
pub enum Inputs {
    /// Inputs of a sequence or pair classifier.
    Classification(Vec<TextInput>),
    /// Inputs of a token classifier.
    Tokens(Vec<TokenInput>),
    /// Inputs of a QA model.
    Qa {
        /// The questions and their contexts.
        examples: Vec<QaExample>,
        /// The `id` printed for each example.
        ids: Vec<Value>,
        /// The input file is SQuAD v2.0.
        version_2: bool,
    },
}

impl Inputs {
    pub(crate) fn len(&self) -> usize {
        match self {
            Inputs::Classification(v) => v.len(),
            Inputs::Tokens(v) => v.len(),
            Inputs::Qa { examples, .. } => examples.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a `.json` file is one SQuAD document (an object with `data`) rather than JSONL.
pub(super) fn is_squad(path: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(serde_json::from_str::<Value>(text).is_ok_and(|v| v.get("data").is_some()))
}

/// The objects of a JSONL file with their line numbers; blank lines are skipped.
pub(super) fn read_records(path: &Path) -> Result<Vec<(u64, serde_json::Map<String, Value>)>> {
    let mut out = Vec::new();
    for (n, line) in read_lines(path)? {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| dataset_err(path, &line_at(n), format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(dataset_err(path, &line_at(n), "expected a JSON object"));
        };
        out.push((n, obj));
    }
    Ok(out)
}

/// A string field of a record: `None` when absent or null; empty or not a string fails.
pub(super) fn text_field(
    path: &Path,
    line: u64,
    obj: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<String>> {
    let err = |msg: String| dataset_err(path, &line_at(line), msg);
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Err(err(format!("empty `{key}`"))),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(err(format!("`{key}` must be a string, found {other}"))),
    }
}

/// A pair model given single texts, or the reverse, fails at the record's line.
pub(super) fn check_pairs(path: &Path, line: u64, want: bool, found: bool) -> Result<()> {
    let msg = match (want, found) {
        (true, false) => {
            "the model classifies sentence pairs: expected `text_a` and `text_b`, \
                          found `text` only"
        }
        (false, true) => {
            "the model classifies single texts: expected `text`, found `text_a` \
                          and `text_b`"
        }
        _ => return Ok(()),
    };
    Err(dataset_err(path, &line_at(line), msg))
}

/// Classification records: `text`, or `text_a` and `text_b`, the same in every record
/// (and as the model's `text_pairs`, when it says).
pub(super) fn read_texts(path: &Path, want_pairs: Option<bool>) -> Result<Vec<TextInput>> {
    let mut first: Option<(bool, u64)> = None;
    let mut out = Vec::new();
    for (n, obj) in read_records(path)? {
        let field = |k: &str| text_field(path, n, &obj, k);
        let (text_a, text_b) = match (field("text")?, field("text_a")?, field("text_b")?) {
            (Some(t), None, None) => (t.trim().to_string(), None),
            (None, Some(a), Some(b)) => (a.trim().to_string(), Some(b.trim().to_string())),
            _ => {
                let want = match want_pairs {
                    Some(true) => "strings `text_a` and `text_b` (the model classifies pairs)",
                    Some(false) => "a string `text` (the model classifies single texts)",
                    None => "a string `text`, or strings `text_a` and `text_b`",
                };
                return Err(dataset_err(path, &line_at(n), format!("expected {want}")));
            }
        };
        let pairs = text_b.is_some();
        match (want_pairs, first) {
            (Some(want), _) => check_pairs(path, n, want, pairs)?,
            (None, Some((p, line))) if p != pairs => {
                let (has, other) = if pairs {
                    ("`text_a` and `text_b`", "`text`")
                } else {
                    ("`text`", "`text_a` and `text_b`")
                };
                return Err(dataset_err(
                    path,
                    &line_at(n),
                    format!(
                        "has {has} but line {line} has {other}: every record needs the same fields"
                    ),
                ));
            }
            (None, None) => first = Some((pairs, n)),
            _ => {}
        }
        out.push(TextInput {
            id: obj.get("id").cloned(),
            text_a,
            text_b,
        });
    }
    Ok(out)
}

/// Token-classification records: a string `text` each.
pub(super) fn read_token_texts(path: &Path) -> Result<Vec<TokenInput>> {
    let mut out = Vec::new();
    for (n, obj) in read_records(path)? {
        let text = text_field(path, n, &obj, "text")?
            .ok_or_else(|| dataset_err(path, &line_at(n), "expected a string `text`"))?;
        out.push(TokenInput {
            id: obj.get("id").cloned(),
            text,
            words: None,
        });
    }
    Ok(out)
}

/// QA records: strings `question` and `context`; the printed id is `id`, else the line.
pub(super) fn read_questions(path: &Path) -> Result<(Vec<QaExample>, Vec<Value>)> {
    let (mut examples, mut ids) = (Vec::new(), Vec::new());
    for (n, obj) in read_records(path)? {
        let field = |k: &str| text_field(path, n, &obj, k);
        let (Some(question), Some(context)) = (field("question")?, field("context")?) else {
            return Err(dataset_err(
                path,
                &line_at(n),
                "expected strings `question` and `context`",
            ));
        };
        ids.push(obj.get("id").cloned().unwrap_or(Value::from(n)));
        examples.push(QaExample {
            id: format!("line {n}"),
            question,
            context,
            answers: vec![],
            is_impossible: false,
        });
    }
    Ok((examples, ids))
}
