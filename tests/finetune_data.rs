//! Fine-tuning data sets: readers on the bundled files and on hostile input, featurisation
//! (pair truncation, NER label alignment, QA windows) and collation.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tandem::data::batch::{TaskLabels, IGNORE};
use tandem::data::finetune::{
    collate_classification, collate_qa, collate_tokens, featurize_qa, ClassificationSet, LabelMap,
    Padding, QaExample, QaOptions, QaSet, TokenSet,
};
use tandem::data::tokenizer::{train_wordpiece, Tokenizer};
use tandem::metrics::entities;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/data")
        .join(rel)
}

fn tmpdir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "tandem-finetune-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A small WordPiece vocabulary trained on the bundled corpus (shared by the tests).
fn tok() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let files = [data("corpus/en.txt"), data("corpus/ko.txt")];
        train_wordpiece(&files, 3000, true, Some(false), 1).unwrap()
    })
}

fn err_of<T: std::fmt::Debug>(r: tandem::Result<T>) -> String {
    r.unwrap_err().to_string()
}

// ---------------------------------------------------------------- bundled files

#[test]
fn bundled_classification_sets_match_the_readme() {
    let train = ClassificationSet::read(&data("sentiment/train.jsonl")).unwrap();
    let dev = ClassificationSet::read(&data("sentiment/dev.jsonl")).unwrap();
    assert_eq!((train.len(), dev.len()), (300, 60));
    assert!(!train.pairs && train.labelled);
    let labels = train.label_map().unwrap();
    assert_eq!(labels.names(), ["negative", "positive"]);
    let ids = dev.label_ids(&labels).unwrap();
    assert_eq!(ids.iter().filter(|i| **i == 1).count(), 30);
    let ids = train.label_ids(&labels).unwrap();
    assert_eq!(ids.iter().filter(|i| **i == 0).count(), 150);

    let train = ClassificationSet::read(&data("pairs/train.jsonl")).unwrap();
    let dev = ClassificationSet::read(&data("pairs/dev.jsonl")).unwrap();
    assert_eq!((train.len(), dev.len()), (240, 50));
    assert!(train.pairs && dev.pairs);
    let labels = train.label_map().unwrap();
    assert_eq!(labels.names(), ["different", "paraphrase"]);
    let ids = dev.label_ids(&labels).unwrap();
    assert_eq!(ids.iter().filter(|i| **i == 1).count(), 25);
}

#[test]
fn bundled_ner_sets_match_the_readme() {
    for (file, sentences, tokens, ents) in [
        ("ner/train.conll", 250, 2435, 475),
        ("ner/dev.conll", 50, 514, 91),
    ] {
        let set = TokenSet::read(&data(file)).unwrap();
        assert_eq!(set.len(), sentences, "{file}");
        assert_eq!(set.num_words(), tokens, "{file}");
        let n: usize = set.examples.iter().map(|e| entities(&e.labels).len()).sum();
        assert_eq!(n, ents, "{file}");
        assert!(set.examples.iter().all(|e| e.words[0] != "-DOCSTART-"));
    }
    let train = TokenSet::read(&data("ner/train.conll")).unwrap();
    let labels = train.label_map().unwrap();
    assert_eq!(
        labels.names(),
        ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    );
    let dev = TokenSet::read(&data("ner/dev.conll")).unwrap();
    dev.label_ids(&labels).unwrap();
}

#[test]
fn bundled_qa_sets_match_the_readme() {
    let train = QaSet::read(&data("qa/train.json")).unwrap();
    let dev = QaSet::read(&data("qa/dev.json")).unwrap();
    assert_eq!((train.len(), train.num_impossible()), (138, 14));
    assert_eq!((dev.len(), dev.num_impossible()), (33, 4));
    assert_eq!(dev.version.as_deref(), Some("v2.0"));
    // Offsets are characters: Korean answers stand at their answer_start too.
    let ko = dev.examples.iter().find(|e| e.id == "dev-009-1").unwrap();
    let (text, start) = &ko.answers[0];
    assert_eq!(ko.context_chars(*start, start + text.chars().count()), text);
}

// ---------------------------------------------------------------- hostile input

#[test]
fn classification_errors_name_file_line_and_expectation() {
    let d = tmpdir("cls");
    let p = write(
        &d,
        "train.jsonl",
        "{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"bad\"}\n",
    );
    let e = err_of(ClassificationSet::read(&p));
    assert!(e.contains("train.jsonl") && e.contains("line 2"), "{e}");
    assert!(e.contains("missing `label`"), "{e}");

    let p = write(
        &d,
        "bad.jsonl",
        "{\"text\": \"good\", \"label\": \"pos\"}\n\n{\"text\": \"bad\", \"label\": \n",
    );
    let e = err_of(ClassificationSet::read(&p));
    assert!(e.contains("line 3") && e.contains("invalid JSON"), "{e}");

    let p = write(
        &d,
        "mixed.jsonl",
        "{\"text\": \"a\", \"label\": \"x\"}\n{\"text_a\": \"a\", \"text_b\": \"b\", \"label\": \"x\"}\n",
    );
    let e = err_of(ClassificationSet::read(&p));
    assert!(e.contains("line 2") && e.contains("same fields"), "{e}");

    let p = write(&d, "empty.jsonl", "\n\n");
    let e = err_of(ClassificationSet::read(&p));
    assert!(
        e.contains("empty.jsonl") && e.contains("no examples"),
        "{e}"
    );

    let train = write(
        &d,
        "t.tsv",
        "text_a\ttext_b\tlabel\nA cat.\tA dog.\tdifferent\nHi.\tHello.\tparaphrase\n",
    );
    let train = ClassificationSet::read(&train).unwrap();
    assert!(train.pairs);
    assert_eq!(train.examples[1].text_b.as_deref(), Some("Hello."));
    let labels = train.label_map().unwrap();
    let dev = write(
        &d,
        "dev.tsv",
        "text_a\ttext_b\tlabel\nA.\tB.\tdifferent\nC.\tD.\tsame\n",
    );
    let e = err_of(ClassificationSet::read(&dev).unwrap().label_ids(&labels));
    assert!(e.contains("dev.tsv") && e.contains("line 3"), "{e}");
    assert!(
        e.contains("unknown label `same`") && e.contains("known labels: different, paraphrase"),
        "{e}"
    );

    let ragged = write(&d, "ragged.tsv", "text\tlabel\nfine\tpos\nno label here\n");
    let e = err_of(ClassificationSet::read(&ragged));
    assert!(e.contains("ragged.tsv, line 3"), "{e}");
    assert!(e.contains("1 tab-separated columns, expected 2"), "{e}");

    let header = write(&d, "header.tsv", "sentence\tlabel\nfine\tpos\n");
    let e = err_of(ClassificationSet::read(&header));
    assert!(
        e.contains("line 1") && e.contains("expected the columns `text`"),
        "{e}"
    );

    // A file without labels reads (prediction), but cannot make a label map.
    let unl = write(&d, "unl.tsv", "text\nfine\nok\n");
    let set = ClassificationSet::read(&unl).unwrap();
    assert!(!set.labelled);
    let e = err_of(set.label_map());
    assert!(e.contains("line 2") && e.contains("missing label"), "{e}");

    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn conll_and_squad_errors_name_file_and_place() {
    let d = tmpdir("conll");
    let p = write(&d, "a.conll", "-DOCSTART- O\n\nAnna B-PER\nflew\nhome O\n");
    let e = err_of(TokenSet::read(&p));
    assert!(
        e.contains("a.conll, line 4") && e.contains("has 1 column"),
        "{e}"
    );
    let p = write(&d, "b.conll", "-DOCSTART- O\n\n\n");
    assert!(err_of(TokenSet::read(&p)).contains("no sentences"));
    // Extra middle columns (POS, chunk) are ignored; CRLF is accepted.
    let p = write(
        &d,
        "c.conll",
        "EU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\r\n\r\nPeter NNP B-NP B-PER\r\n",
    );
    let set = TokenSet::read(&p).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set.examples[0].labels, ["B-ORG", "O"]);
    assert_eq!(set.examples[1].line, 4);
    let labels = LabelMap::from_names(["O", "B-PER"]).unwrap();
    let e = err_of(set.label_ids(&labels));
    assert!(
        e.contains("line 1") && e.contains("unknown label `B-ORG`"),
        "{e}"
    );

    let squad = |answer: &str, start: usize| {
        format!(
            r#"{{"version": "v2.0", "data": [{{"title": "t", "paragraphs": [{{
  "context": "Émile went to Paris in 1990.",
  "qas": [{{"id": "q-7", "question": "Where?", "answers": [{{"text": "{answer}", "answer_start": {start}}}]}}]
}}]}}]}}"#
        )
    };
    // Character offsets: "Paris" starts at character 14 (byte 15, after the two-byte É).
    let ok = write(&d, "ok.json", &squad("Paris", 14));
    let set = QaSet::read(&ok).unwrap();
    assert_eq!(set.examples[0].answers, [("Paris".to_string(), 14)]);
    let bad = write(&d, "bad.json", &squad("Paris", 15));
    let e = err_of(QaSet::read(&bad));
    assert!(
        e.contains("bad.json") && e.contains("question `q-7`"),
        "{e}"
    );
    assert!(
        e.contains("not at character 15") && e.contains("`aris `"),
        "{e}"
    );
    let past = write(&d, "past.json", &squad("Paris", 99));
    assert!(err_of(QaSet::read(&past)).contains("past the end of the context"));
    let broken = write(
        &d,
        "broken.json",
        "{\"data\": [\n  {\"paragraphs\": [}\n]}\n",
    );
    let e = err_of(QaSet::read(&broken));
    assert!(e.contains("broken.json") && e.contains("line 2"), "{e}");
    let no_ans = write(
        &d,
        "noans.json",
        r#"{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "x", "question": "q", "answers": []}]}]}]}"#,
    );
    let e = err_of(QaSet::read(&no_ans));
    assert!(
        e.contains("question `x`") && e.contains("is_impossible"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------- featurisation

#[test]
fn classification_features_truncate_pairs_and_collate() {
    let tok = tok();
    let d = tmpdir("feat");
    let long = "the weather was cold and the river froze early that winter ".repeat(4);
    let p = write(
        &d,
        "p.jsonl",
        &format!(
            "{{\"text_a\": \"{long}\", \"text_b\": \"a short one\", \"label\": \"x\"}}\n\
             {{\"text_a\": \"tea\", \"text_b\": \"coffee\", \"label\": \"y\"}}\n"
        ),
    );
    let set = ClassificationSet::read(&p).unwrap();
    let labels = set.label_map().unwrap();
    let f = set.featurize(tok, Some(&labels), 16).unwrap();
    // The long side loses tokens first; the short one keeps min(its length, 13 / 2).
    let b_len = tok.encode("a short one").unwrap().len().min(6);
    assert_eq!(f[0].input_ids.len(), 16);
    assert!(f[0].truncated && !f[1].truncated);
    // [CLS] a… [SEP] b [SEP]: segment 1 covers b and its [SEP].
    let ids = &f[0].input_ids;
    assert_eq!((ids[0], ids[15]), (tok.cls_id(), tok.sep_id()));
    assert_eq!(ids[15 - b_len - 1], tok.sep_id());
    assert_eq!(
        f[0].token_type_ids.iter().filter(|t| **t == 1).count(),
        b_len + 1
    );
    assert_eq!(f[1].label, Some(1));

    let b = collate_classification(&f, tok.pad_id(), Padding::Longest).unwrap();
    assert_eq!((b.batch, b.seq), (2, 16));
    assert_eq!(b.labels, TaskLabels::Classes(vec![0, 1]));
    let n1 = f[1].input_ids.len();
    assert_eq!(b.attention_mask[16..16 + n1], vec![1; n1][..]);
    assert!(b.attention_mask[16 + n1..].iter().all(|m| *m == 0));
    assert!(b.input_ids[16 + n1..].iter().all(|i| *i == tok.pad_id()));
    let b = collate_classification(&f, tok.pad_id(), Padding::Fixed(20)).unwrap();
    assert_eq!(b.seq, 20);
    assert!(collate_classification(&f, tok.pad_id(), Padding::Fixed(8)).is_err());
    let unl = set.featurize(tok, None, 16).unwrap();
    let b = collate_classification(&unl, tok.pad_id(), Padding::Longest).unwrap();
    assert_eq!(b.labels, TaskLabels::None);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ner_labels_go_on_first_sub_tokens_only() {
    let tok = tok();
    let d = tmpdir("ner");
    // "Kowalczykowski" is not in a 3000-piece vocabulary: it splits into several pieces.
    let p = write(
        &d,
        "s.conll",
        "Anna B-PER\nKowalczykowski I-PER\nflew O\nto O\nWarsaw B-LOC\n. O\n",
    );
    let set = TokenSet::read(&p).unwrap();
    let labels = set.label_map().unwrap();
    let id = |n: &str| labels.id(n).unwrap() as i64;
    let pieces: Vec<usize> = set.examples[0]
        .words
        .iter()
        .map(|w| tok.encode(w).unwrap().len())
        .collect();
    assert!(pieces[1] > 1, "the long name should split: {pieces:?}");
    let f = &set.featurize(tok, Some(&labels), 64).unwrap()[0];
    assert_eq!(f.truncated_words, 0);
    let lab = f.labels.as_ref().unwrap();
    let mut expected = vec![IGNORE];
    let mut words = vec![None];
    for (w, (n, name)) in pieces.iter().zip(&set.examples[0].labels).enumerate() {
        expected.push(id(name));
        expected.extend(std::iter::repeat_n(IGNORE, n - 1));
        words.extend(std::iter::repeat_n(Some(w as u32), *n));
    }
    expected.push(IGNORE);
    words.push(None);
    assert_eq!(lab, &expected);
    assert_eq!(f.word_ids, words);
    assert_eq!(lab.iter().filter(|l| **l != IGNORE).count(), 6);

    // Too short for the sentence: the words that do not fit are cut and counted.
    let cut = &set
        .featurize(tok, Some(&labels), 2 + pieces[0] + 1)
        .unwrap()[0];
    assert_eq!(cut.input_ids.len(), 2 + pieces[0] + 1);
    assert_eq!(cut.truncated_words, 4); // Kowalczykowski keeps its first piece.
    let mut want = vec![id("B-PER")];
    want.extend(std::iter::repeat_n(IGNORE, pieces[0] - 1));
    want.push(id("I-PER"));
    assert_eq!(
        cut.labels.as_ref().unwrap()[1..cut.input_ids.len() - 1],
        want
    );

    // Collation pads labels with IGNORE.
    let dev = TokenSet::read(&data("ner/dev.conll")).unwrap();
    let fs = dev.featurize(tok, Some(&labels_of_train()), 128).unwrap();
    let b = collate_tokens(&fs[..4], tok.pad_id(), Padding::Longest).unwrap();
    let TaskLabels::Tokens(l) = &b.labels else {
        panic!("expected token labels, got {:?}", b.labels)
    };
    assert_eq!(l.len(), b.batch * b.seq);
    for (r, f) in fs[..4].iter().enumerate() {
        let row = &l[r * b.seq..(r + 1) * b.seq];
        assert_eq!(
            &row[..f.input_ids.len()],
            f.labels.as_ref().unwrap().as_slice()
        );
        assert!(row[f.input_ids.len()..].iter().all(|x| *x == IGNORE));
        let words = dev.examples[r].words.len();
        assert_eq!(row.iter().filter(|x| **x != IGNORE).count(), words);
    }
    let _ = std::fs::remove_dir_all(&d);
}

fn labels_of_train() -> LabelMap {
    TokenSet::read(&data("ner/train.conll"))
        .unwrap()
        .label_map()
        .unwrap()
}

/// Sentences numbered so that every window differs, the answer near the end.
fn long_example() -> QaExample {
    let mut context = String::new();
    for i in 0..30 {
        context.push_str(&format!("On day {i} the farmer walked to the market. "));
    }
    let answer = "the old stone bridge";
    let start = context.chars().count();
    context.push_str(&format!("Then he crossed {answer} near the mill. "));
    let start = start + "Then he crossed ".len();
    context.push_str("He came home late in the evening.");
    QaExample {
        id: "long".into(),
        question: "  What did the farmer cross?".into(),
        context,
        answers: vec![(answer.into(), start)],
        is_impossible: false,
    }
}

#[test]
fn qa_windows_slide_with_stride_and_label_the_answer() {
    let tok = tok();
    let e = long_example();
    let opts = QaOptions {
        max_seq_length: 48,
        doc_stride: 12,
        max_query_length: 16,
    };
    let f = featurize_qa(std::slice::from_ref(&e), tok, &opts).unwrap();
    let mut q = tok.encode(e.question.trim_start()).unwrap();
    q.truncate(16);
    let ctx = tok.inner().encode(e.context.as_str(), false).unwrap();
    let window = 48 - q.len() - 3;
    let n = ctx.get_ids().len();
    assert!(f.len() >= 4, "{} windows", f.len());
    // Windows start every window - stride tokens; the last one reaches the end.
    assert_eq!(f.len(), 1 + (n - window).div_ceil(window - 12));
    let ctx_tokens = |x: &tandem::data::finetune::QaFeature| -> Vec<u32> {
        let first = q.len() + 2;
        x.input_ids[first..x.input_ids.len() - 1].to_vec()
    };
    for (k, x) in f.iter().enumerate() {
        assert!(x.input_ids.len() <= 48);
        assert_eq!(x.example_index, 0);
        assert_eq!(x.input_ids[0], tok.cls_id());
        assert_eq!(&x.input_ids[1..=q.len()], q.as_slice());
        assert_eq!(x.input_ids[q.len() + 1], tok.sep_id());
        assert_eq!(*x.input_ids.last().unwrap(), tok.sep_id());
        assert_eq!(x.token_type_ids[q.len() + 1], 0);
        assert_eq!(x.token_type_ids[q.len() + 2], 1);
        assert!(x.offsets[..q.len() + 2].iter().all(Option::is_none));
        assert!(x.offsets.last().unwrap().is_none());
        if k > 0 {
            let (prev, cur) = (ctx_tokens(&f[k - 1]), ctx_tokens(x));
            assert_eq!(
                prev[prev.len() - 12..],
                cur[..12],
                "window {k} overlaps by 12"
            );
        }
    }
    assert_eq!(
        ctx_tokens(f.last().unwrap()).last(),
        ctx.get_ids().last(),
        "the last window reaches the end of the context"
    );
    let labelled: Vec<_> = f.iter().filter(|x| x.start_position != 0).collect();
    assert!(!labelled.is_empty());
    for x in &f {
        let (s, t) = (x.start_position as usize, x.end_position as usize);
        if s == 0 {
            assert_eq!(t, 0);
            continue;
        }
        assert!(s <= t && x.token_type_ids[s] == 1);
        let (a, _) = x.offsets[s].unwrap();
        let (_, b) = x.offsets[t].unwrap();
        assert_eq!(e.context_chars(a, b).to_lowercase(), e.answers[0].0);
    }
    // The first window is far from the answer.
    assert_eq!((f[0].start_position, f[0].end_position), (0, 0));
    let b = collate_qa(&f, tok.pad_id(), Padding::Longest).unwrap();
    let TaskLabels::Spans { start, end } = &b.labels else {
        panic!("expected spans")
    };
    assert_eq!(start.len(), f.len());
    assert_eq!(end[f.len() - 1], f.last().unwrap().end_position);

    // An unanswerable question points every window at [CLS].
    let mut imp = e.clone();
    imp.answers.clear();
    imp.is_impossible = true;
    let f = featurize_qa(&[imp], tok, &opts).unwrap();
    assert!(f
        .iter()
        .all(|x| (x.start_position, x.end_position) == (0, 0)));
    // A stride that does not fit the window is refused.
    let bad = QaOptions {
        doc_stride: 40,
        ..opts
    };
    assert!(featurize_qa(&[e], tok, &bad).is_err());
}

#[test]
fn qa_bundled_dev_answers_are_recovered_from_offsets() {
    let tok = tok();
    let dev = QaSet::read(&data("qa/dev.json")).unwrap();
    let opts = QaOptions {
        max_seq_length: 96,
        doc_stride: 24,
        max_query_length: 32,
    };
    let f = dev.featurize(tok, &opts).unwrap();
    assert!(
        f.len() > dev.len(),
        "contexts of ~300 characters need several windows"
    );
    for (i, e) in dev.examples.iter().enumerate() {
        let mine: Vec<_> = f.iter().filter(|x| x.example_index == i).collect();
        let hits: Vec<String> = mine
            .iter()
            .filter(|x| x.start_position != 0)
            .map(|x| {
                let (a, _) = x.offsets[x.start_position as usize].unwrap();
                let (_, b) = x.offsets[x.end_position as usize].unwrap();
                e.context_chars(a, b).to_lowercase()
            })
            .collect();
        if e.is_impossible {
            assert!(hits.is_empty(), "{}", e.id);
            continue;
        }
        assert!(!hits.is_empty(), "{}: no window holds the answer", e.id);
        let answer = e.answers[0].0.to_lowercase();
        for h in hits {
            // Korean answers can end inside a word (a particle follows): then the span is the
            // whole piece that holds the answer's end.
            if e.id.starts_with("dev-008") || e.id.starts_with("dev-009") {
                assert!(h.starts_with(&answer), "{}: {h} vs {answer}", e.id);
            } else {
                assert_eq!(h, answer, "{}", e.id);
            }
        }
    }
}
