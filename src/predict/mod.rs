//! `tandem predict`: batch inference with a fine-tuned head, one JSON line per input.
//!
//! The checkpoint is an HF task directory (`config.json` + `model.safetensors`): the head
//! comes from `architectures`, the label names from `id2label`, and the tokenizer from
//! `tokenizer.json` / `vocab.txt` beside it (or, for a checkpoint inside a tandem state_dir,
//! the job's `tokenizer/`). A state_dir itself means its exported `final/` model.
//!
//! Inputs are JSONL (`text`, or `text_a` + `text_b`, for classification; `text` for token
//! classification; `question` + `context` for QA; an `id` is passed through, other keys are
//! ignored) or what the fine-tuning readers accept: classification TSV, CoNLL, SQuAD JSON.
//! Outputs, in input order:
//!
//! - classification: `{"label", "probabilities": {name: p}}` (softmax, names in id order);
//! - token classification: `{"entities": [{"type", "text", "start", "end", "score"}],
//!   "tokens": [{"word", "label"}]}`: each word's label is the argmax at its first sub-token
//!   (as the model was trained), entities are decoded from the word tags as seqeval does, and
//!   `start`/`end` are character offsets (Unicode scalars, end exclusive) into the text; a
//!   word cut off by `max_seq_length` gets `"label": null`;
//! - QA: `{"id", "answer", "start", "end", "score"}` from [`postprocess_qa`] over all windows
//!   of the context; `score` is the start + end logit, and an unanswered question (SQuAD v2.0
//!   style) has the empty answer at 0..0.
//!
//! Two optional `config.json` keys refine what the model expects: `"text_pairs": true|false`
//! (a classifier of sentence pairs or of single texts; without it the first input decides)
//! and `"version_2_with_negative": true` (the null answer can win; a SQuAD v2.0 input file
//! also turns it on).

#![warn(missing_docs)]

mod inputs;
mod output;
mod predictor;

pub use inputs::{Inputs, TextInput, TokenInput};
pub use output::{
    decode_entities, qa_options, softmax, AnswerPrediction, ClassPrediction, EntitySpan,
    Prediction, TokenPrediction, WordLabel,
};
pub use predictor::Predictor;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::data::batch::TaskLabels;
use crate::data::finetune::qa::char_slice;
use crate::data::finetune::{
    collate_classification, collate_qa, collate_tokens, dataset_err, featurize_qa, line_at,
    read_lines, ClassificationExample, ClassificationSet, Padding, QaExample, QaFeature, QaOptions,
    QaSet, TokenExample, TokenFeature, TokenSet,
};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::metrics::{argmax, entities, postprocess_qa, QaPostprocess};
use crate::model::hf::CONFIG_FILE;
use crate::model::{BertConfig, TaskHead, TaskModel};

/// Sequence length when neither `--max-seq-length` nor the tokenizer's config gives one.
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 128;

/// What `tandem predict` does.
#[derive(Clone, Debug)]
pub struct PredictOptions {
    /// Fine-tuned checkpoint directory, or a tandem state_dir.
    pub checkpoint: PathBuf,
    /// Input file: JSONL, classification TSV, CoNLL or SQuAD JSON.
    pub input: PathBuf,
    /// JSONL output file (written whole, then renamed into place); `None` is stdout.
    pub output: Option<PathBuf>,
    /// Sequences (QA: windows) per forward pass.
    pub batch_size: usize,
    /// Longest sequence in tokens (at most the model's `max_position_embeddings`); `None`:
    /// the tokenizer's `model_max_length`, else [`DEFAULT_MAX_SEQ_LENGTH`].
    pub max_seq_length: Option<usize>,
    /// QA: tokens shared by consecutive windows of a long context.
    pub doc_stride: usize,
}

/// `tandem predict`: loads the checkpoint, reads the input and writes one line per input.
pub fn run(opts: &PredictOptions) -> Result<()> {
    let device = Device::cuda_if_available(0)?;
    let p = Predictor::load(&opts.checkpoint, &device)?;
    let inputs = p.read_inputs(&opts.input)?;
    let bar = progress_bar(inputs.len() as u64);
    match &opts.output {
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            p.predict(&inputs, opts, &bar, |v| {
                write_line(&mut out, &v, Path::new("stdout"))
            })?;
            out.flush().map_err(|e| Error::io("stdout", e))?;
        }
        Some(path) => {
            let tmp = path.with_extension("tmp");
            let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut out = std::io::BufWriter::new(file);
            let written = p
                .predict(&inputs, opts, &bar, |v| write_line(&mut out, &v, &tmp))
                .and_then(|()| out.flush().map_err(|e| Error::io(&tmp, e)));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn write_line(out: &mut impl Write, p: &Prediction, path: &Path) -> Result<()> {
    let line = serde_json::to_string(p).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })?;
    writeln!(out, "{line}").map_err(|e| Error::io(path, e))
}

/// A bar on stderr when it is a terminal; hidden otherwise.
fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} · ETA {eta}",
        )
        .expect("template"),
    );
    b
}

/// The model directory of `checkpoint`: itself, or a state_dir's exported `final/`.
pub(super) fn model_dir(checkpoint: &Path) -> Result<PathBuf> {
    let err = |msg: &str| Error::Checkpoint {
        path: checkpoint.into(),
        msg: msg.into(),
    };
    if checkpoint.join(CONFIG_FILE).is_file() {
        return Ok(checkpoint.into());
    }
    let exported = checkpoint.join("final");
    if exported.join(CONFIG_FILE).is_file() {
        return Ok(exported);
    }
    if !checkpoint.is_dir() {
        return Err(err("no such directory"));
    }
    Err(err(
        "no config.json: expected a checkpoint directory (config.json, model.safetensors) or a \
         tandem state_dir with an exported final/",
    ))
}

/// Refuses a configuration that is not one of the three task heads, before loading weights.
pub(super) fn check_task_head(dir: &Path, cfg: &BertConfig) -> Result<()> {
    let heads = [
        TaskHead::SequenceClassification { num_labels: 2 },
        TaskHead::TokenClassification { num_labels: 2 },
        TaskHead::QuestionAnswering,
    ]
    .map(|h| h.architecture());
    let arch = (cfg.extra.get("architectures"))
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let found = match arch {
        Some(a) if heads.contains(&a) => return Ok(()),
        Some(a) => format!("architectures = [{a:?}]"),
        None => "config.json has no `architectures`, so it".into(),
    };
    Err(Error::Checkpoint {
        path: dir.into(),
        msg: format!(
            "{found} is not a fine-tuned head (expected {}): fine-tune a task on it first",
            heads.join(", ")
        ),
    })
}

/// Where the tokenizer of `dir` is: beside it, or a state_dir's `tokenizer/` for a
/// checkpoint in `state_dir/checkpoints/NAME`.
pub(super) fn tokenizer_dir(dir: &Path) -> Result<PathBuf> {
    let has = |d: &Path| d.join("tokenizer.json").is_file() || d.join("vocab.txt").is_file();
    let state_dir = dir.parent().and_then(Path::parent);
    let job = state_dir.map(|s| s.join("tokenizer"));
    if has(dir) {
        return Ok(dir.into());
    }
    match job {
        Some(j) if has(&j) => Ok(j),
        _ => Err(Error::Checkpoint {
            path: dir.into(),
            msg: "no tokenizer.json or vocab.txt beside the model: save the fine-tuning \
                  tokenizer into this directory"
                .into(),
        }),
    }
}
