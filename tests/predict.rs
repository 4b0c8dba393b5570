//! `tandem predict` on the committed round-trip checkpoints (tests/fixtures/roundtrip): the
//! real binary's JSONL against the library (featurise, `TaskModel::logits`, `postprocess_qa`),
//! character spans, input order, and the errors for bad input and non-task checkpoints.
//!
//! The fixtures hold no tokenizer, so each test copies one into a temporary directory with a
//! hand-made `vocab.txt` of exactly the model's 40 ids.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use serde_json::{json, Value};
use tandem::data::finetune::qa::char_slice;
use tandem::data::finetune::{
    collate_classification, collate_qa, featurize_qa, ClassificationSet, Padding,
};
use tandem::data::tokenizer::Tokenizer;
use tandem::metrics::{argmax, postprocess_qa, QaPostprocess};
use tandem::model::TaskModel;
use tandem::predict::{decode_entities, qa_options, softmax, Inputs, PredictOptions, Predictor};

/// 5 specials, punctuation and 32 words: 40 ids, the fixtures' `vocab_size`.
const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "the", "a", "cat", "dog", "sat",
    "on", "mat", "john", "smith", "lives", "in", "paris", "london", "where", "does", "who", "is",
    "what", "good", "bad", "movie", "was", "very", "and", "works", "at", "google", "today", "went",
    "to", "##s", "ok",
];

fn tmpdir(name: &str) -> common::TmpDir {
    common::TmpDir::new("predict", name)
}

/// A copy of a round-trip fixture with a tokenizer; `config` edits its config.json.
fn checkpoint(name: &str, config: impl FnOnce(&mut Value)) -> common::TmpDir {
    assert_eq!(VOCAB.len(), 40);
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/roundtrip")
        .join(name);
    let dir = tmpdir(name);
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 40);
    config(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("vocab.txt"), VOCAB.join("\n") + "\n").unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn jsonl(records: &[Value]) -> String {
    records.iter().map(|r| format!("{r}\n")).collect()
}

fn predict(ck: &Path, input: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("predict")
        .arg("--checkpoint")
        .arg(ck)
        .arg("--input")
        .arg(input)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// The JSON lines of a successful run.
fn lines(out: &Output) -> Vec<Value> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "predict failed: {stderr}");
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The error of a failed run.
fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "predict should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const TEXTS: &[&str] = &[
    "the cat sat on the mat .",
    "john smith lives in paris",
    "a very good movie",
    "what a bad movie , very bad .",
    "the dog works at google today and the cat went to london , ok ?",
];

#[test]
fn classification_matches_the_model_logits_in_input_order() {
    let ck = checkpoint("seqcls", |_| {});
    let dir = tmpdir("seqcls-in");
    let records: Vec<Value> = (TEXTS.iter().enumerate())
        .map(|(i, t)| json!({"id": format!("ex{i}"), "text": t, "source": "test"}))
        .collect();
    let input = write(&dir, "in.jsonl", &jsonl(&records));
    let out = predict(
        &ck,
        &input,
        &["--batch-size", "2", "--max-seq-length", "16"],
    );
    let got = lines(&out);
    assert_eq!(got.len(), TEXTS.len());

    // The same featurisation and batches, straight through the model.
    let (model, _) = TaskModel::load(&ck, 0, &Device::Cpu).unwrap();
    let tok = Tokenizer::load(&ck).unwrap();
    let set = ClassificationSet::read(&input).unwrap();
    let features = set.featurize(&tok, None, 16).unwrap();
    let mut want = Vec::new();
    for chunk in features.chunks(2) {
        let b = collate_classification(chunk, tok.pad_id(), Padding::Longest).unwrap();
        want.extend(model.logits(&b).unwrap().to_vec2::<f32>().unwrap());
    }
    let names = ["neg", "neu", "pos"];
    assert_eq!(model.labels(), names);
    let stdout = String::from_utf8(out.stdout).unwrap();
    for (i, ((g, logits), raw)) in got.iter().zip(&want).zip(stdout.lines()).enumerate() {
        assert_eq!(g["id"], format!("ex{i}"), "order and id pass-through");
        let probs = g["probabilities"].as_object().unwrap();
        let p: Vec<f64> = names.iter().map(|n| probs[*n].as_f64().unwrap()).collect();
        assert_eq!(probs.len(), 3);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{p:?}");
        let best = names[p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0];
        assert_eq!(g["label"], best, "the label is the most probable");
        assert_eq!(
            g["label"],
            names[argmax(logits)],
            "argmax of TaskModel::logits"
        );
        for (x, y) in p.iter().zip(softmax(logits)) {
            assert!((x - y as f64).abs() < 1e-6);
        }
        // Names in id order in the line itself.
        let at: Vec<usize> = names
            .iter()
            .map(|n| raw.find(&format!("\"{n}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{raw}");
    }

    // --output writes the same lines; the default max_seq_length is capped at the model's.
    let file = dir.join("out.jsonl");
    let out = predict(
        &ck,
        &input,
        &["--batch-size", "2", "--output", file.to_str().unwrap()],
    );
    assert!(lines(&out).is_empty());
    let written: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(written, got);
}

#[test]
fn pairs_tsv_and_input_errors_name_file_and_line() {
    let ck = checkpoint("seqcls", |_| {});
    let dir = tmpdir("pairs");
    let pairs = jsonl(&[
        json!({"text_a": "the cat sat", "text_b": "a dog sat", "label": "pos"}),
        json!({"text_a": "john lives in paris", "text_b": "who lives in london ?"}),
    ]);
    let input = write(&dir, "pairs.jsonl", &pairs);
    assert_eq!(
        lines(&predict(&ck, &input, &["--max-seq-length", "16"])).len(),
        2
    );
    let tsv = write(
        &dir,
        "in.tsv",
        "text\tlabel\nthe cat\tpos\na bad movie\tneg\n",
    );
    let got = lines(&predict(&ck, &tsv, &["--max-seq-length", "16"]));
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|g| g.get("id").is_none()));

    // A record without its text.
    let bad = write(
        &dir,
        "bad.jsonl",
        "{\"text\": \"the cat\"}\n{\"txt\": \"a dog\"}\n",
    );
    let e = failure(&predict(&ck, &bad, &[]));
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    assert!(e.contains("expected a string `text`"), "{e}");
    // Single texts after pairs.
    let mixed = write(&dir, "mixed.jsonl", &(pairs + "\n{\"text\": \"ok\"}\n"));
    let e = failure(&predict(&ck, &mixed, &[]));
    assert!(
        e.contains("mixed.jsonl, line 4") && e.contains("same fields"),
        "{e}"
    );
    // A pair model (as its config says) given single texts.
    let pair_ck = checkpoint("seqcls", |c| c["text_pairs"] = json!(true));
    let single = write(&dir, "single.jsonl", "{\"text\": \"the cat\"}\n");
    let e = failure(&predict(&pair_ck, &single, &[]));
    assert!(
        e.contains("single.jsonl, line 1") && e.contains("sentence pairs"),
        "{e}"
    );
    assert!(e.contains("found `text` only"), "{e}");
    let e = failure(&predict(&ck, &dir.join("absent.jsonl"), &[]));
    assert!(e.contains("absent.jsonl"), "{e}");
}

#[test]
fn a_pretraining_checkpoint_is_not_a_fine_tuned_head() {
    let ck = checkpoint("seqcls", |c| {
        c["architectures"] = json!(["BertForPreTraining"]);
    });
    let dir = tmpdir("pretrain");
    let input = write(&dir, "in.jsonl", "{\"text\": \"the cat\"}\n");
    let e = failure(&predict(&ck, &input, &[]));
    assert!(e.contains("not a fine-tuned head"), "{e}");
    assert!(e.contains("BertForPreTraining"), "{e}");
    let e = Predictor::load(&ck, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a fine-tuned head"), "{e}");
    // No tokenizer beside the model.
    let bare = checkpoint("seqcls", |_| {});
    std::fs::remove_file(bare.join("vocab.txt")).unwrap();
    let e = failure(&predict(&bare, &input, &[]));
    assert!(e.contains("no tokenizer.json or vocab.txt"), "{e}");
}

/// Every entity's span slices the text to the entity's text; every word is a slice too.
fn check_spans(g: &Value, text: &str) {
    for e in g["entities"].as_array().unwrap() {
        let (s, t) = (
            e["start"].as_u64().unwrap() as usize,
            e["end"].as_u64().unwrap() as usize,
        );
        assert!(s < t, "{e}");
        assert_eq!(char_slice(text, s, t), e["text"], "{e}");
        assert!(e["type"].is_string() && e["score"].as_f64().unwrap() <= 1.0);
    }
    for w in g["tokens"].as_array().unwrap() {
        assert!(text.contains(w["word"].as_str().unwrap()), "{w}");
    }
}

#[test]
fn token_classification_words_labels_and_character_spans() {
    let ck = checkpoint("tokcls", |_| {});
    let dir = tmpdir("tokcls-in");
    let texts = [
        "John Smith lives in Paris.",
        "Zoë and Jöhn went to London today, ok?",
        "the cat sat on the mat and the dog sat on the mat today , ok",
    ];
    let records: Vec<Value> = texts.iter().map(|t| json!({ "text": t })).collect();
    let input = write(&dir, "in.jsonl", &jsonl(&records));
    let got = lines(&predict(
        &ck,
        &input,
        &["--max-seq-length", "16", "--batch-size", "2"],
    ));
    assert_eq!(got.len(), texts.len());
    let names = ["O", "B", "I", "X"];
    let words: Vec<Vec<&str>> = got
        .iter()
        .map(|g| {
            (g["tokens"].as_array().unwrap().iter())
                .map(|w| w["word"].as_str().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(words[0], ["John", "Smith", "lives", "in", "Paris", "."]);
    assert_eq!(words[1][..3], ["Zoë", "and", "Jöhn"]);
    for (g, t) in got.iter().zip(texts) {
        check_spans(g, t);
        for w in g["tokens"].as_array().unwrap() {
            let l = &w["label"];
            assert!(l.is_null() || names.contains(&l.as_str().unwrap()), "{w}");
        }
    }
    // The last text has 16 words of one token: 14 fit in 16 tokens with [CLS] and [SEP], the
    // rest get no label.
    let last = got[2]["tokens"].as_array().unwrap();
    assert_eq!(last.len(), 16);
    assert!(last[..14].iter().all(|w| !w["label"].is_null()));
    assert!(last[14..].iter().all(|w| w["label"].is_null()));

    // CoNLL input: the words joined by spaces are the text the spans refer to.
    let conll = write(
        &dir,
        "in.conll",
        "-DOCSTART- O\n\nJohn B\nlives O\n\nParis B\n. O\n",
    );
    let got = lines(&predict(&ck, &conll, &["--max-seq-length", "16"]));
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0]["text"].as_str(), got[1]["text"].as_str()),
        (Some("John lives"), Some("Paris ."))
    );
    for g in &got {
        check_spans(g, g["text"].as_str().unwrap());
    }
}

#[test]
fn entities_are_decoded_from_word_tags_into_character_spans() {
    let text = "Zoë Smith lives in Paris.";
    let spans = [(0, 3), (4, 9), (10, 15), (16, 18), (19, 24), (24, 25)];
    let tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "O"];
    let scores = [0.9, 0.7, 0.5, 0.5, 0.6, 0.9];
    let e = decode_entities(text, &spans, &tags, &scores);
    assert_eq!(e.len(), 2);
    assert_eq!(
        (e[0].kind.as_str(), e[0].text.as_str(), e[0].start, e[0].end),
        ("PER", "Zoë Smith", 0, 9)
    );
    assert!((e[0].score - 0.8).abs() < 1e-6);
    assert_eq!(
        (e[1].kind.as_str(), e[1].text.as_str(), e[1].start, e[1].end),
        ("LOC", "Paris", 19, 24)
    );
    // Tags for a prefix of the words (the rest cut off).
    assert_eq!(
        decode_entities(text, &spans, &tags[..2], &scores[..2]).len(),
        1
    );
}

#[test]
fn question_answering_spans_over_windows() {
    let ck = checkpoint("qa", |_| {});
    let dir = tmpdir("qa-in");
    let long = "john smith lives in paris and works at google , the cat sat on the mat today \
                and the dog went to london .";
    let records = [
        json!({"id": "q1", "question": "who lives in paris ?", "context": "john smith lives in paris ."}),
        json!({"question": "where does the dog go ?", "context": long}),
        json!({"id": 7, "question": "what sat ?", "context": "Zoë's cat sat on the mat."}),
    ];
    let input = write(&dir, "in.jsonl", &jsonl(&records));
    let args = [
        "--max-seq-length",
        "16",
        "--doc-stride",
        "3",
        "--batch-size",
        "3",
    ];
    let got = lines(&predict(&ck, &input, &args));
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["id"], "q1");
    assert_eq!(got[1]["id"], 2, "without an id, the line number");
    assert_eq!(got[2]["id"], 7);
    for (g, r) in got.iter().zip(&records) {
        let ctx = r["context"].as_str().unwrap();
        let (s, t) = (
            g["start"].as_u64().unwrap() as usize,
            g["end"].as_u64().unwrap() as usize,
        );
        assert_eq!(char_slice(ctx, s, t), g["answer"], "{g}");
        assert!(s <= t && t <= ctx.chars().count());
    }

    // The answers are postprocess_qa's, over the same windows and logits.
    let p = Predictor::load(&ck, &Device::Cpu).unwrap();
    let Inputs::Qa { examples, .. } = p.read_inputs(&input).unwrap() else {
        panic!("QA inputs expected")
    };
    let qa = qa_options(16, 3).unwrap();
    let features = featurize_qa(&examples, &p.tokenizer, &qa).unwrap();
    assert!(
        features.iter().filter(|f| f.example_index == 1).count() > 1,
        "several windows"
    );
    let (mut starts, mut ends) = (Vec::new(), Vec::new());
    for chunk in features.chunks(3) {
        let b = collate_qa(chunk, p.tokenizer.pad_id(), Padding::Longest).unwrap();
        for rows in p.model.logits(&b).unwrap().to_vec3::<f32>().unwrap() {
            starts.push(rows.iter().map(|r| r[0]).collect::<Vec<f32>>());
            ends.push(rows.iter().map(|r| r[1]).collect::<Vec<f32>>());
        }
    }
    let want = postprocess_qa(
        &examples,
        &features,
        &starts,
        &ends,
        &QaPostprocess::default(),
    )
    .unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["answer"], w.text.as_str());
        match w.score {
            Some(s) if !w.text.is_empty() => {
                assert!((g["score"].as_f64().unwrap() - s as f64).abs() < 1e-5)
            }
            _ => assert!(g["score"].is_null()),
        }
    }

    // SQuAD v2.0 input: its ids, and the null answer can win.
    let squad = json!({"version": "v2.0", "data": [{"paragraphs": [{
    "context": "john smith lives in paris .",
    "qas": [
        {"id": "a", "question": "who lives in paris ?", "answers": [{"text": "john smith", "answer_start": 0}]},
        {"id": "b", "question": "what is the cat ?", "answers": [], "is_impossible": true}
    ]}]}]});
    let file = write(&dir, "squad.json", &squad.to_string());
    let got = lines(&predict(&ck, &file, &["--max-seq-length", "16"]));
    assert_eq!(
        (got[0]["id"].as_str(), got[1]["id"].as_str()),
        (Some("a"), Some("b"))
    );
    for g in &got {
        assert!(g["null_score_diff"].is_number() || g["answer"] == "", "{g}");
        let (s, t) = (
            g["start"].as_u64().unwrap() as usize,
            g["end"].as_u64().unwrap() as usize,
        );
        assert_eq!(char_slice("john smith lives in paris .", s, t), g["answer"]);
    }
    let bad = write(&dir, "bad.jsonl", "{\"question\": \"who ?\"}\n");
    let e = failure(&predict(&ck, &bad, &[]));
    assert!(
        e.contains("bad.jsonl, line 1") && e.contains("`question` and `context`"),
        "{e}"
    );
}

#[test]
fn predict_options_reject_a_zero_batch() {
    let ck = checkpoint("seqcls", |_| {});
    let dir = tmpdir("zero");
    let input = write(&dir, "in.jsonl", "{\"text\": \"the cat\"}\n");
    let opts = PredictOptions {
        checkpoint: ck.to_path_buf(),
        input: input.clone(),
        output: None,
        batch_size: 0,
        max_seq_length: Some(16),
        doc_stride: 4,
    };
    let p = Predictor::load(&ck, &Device::Cpu).unwrap();
    let inputs = p.read_inputs(&input).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    let e = p
        .predict(&inputs, &opts, &bar, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--batch-size"), "{e}");
}
