//! Metrics: hand-computed classification, seqeval and SQuAD cases, reducibility over ranks,
//! and QA post-processing from logits back to answer text.

use std::path::{Path, PathBuf};

use tandem::data::finetune::{QaExample, QaFeature, QaOptions, QaSet};
use tandem::data::tokenizer::train_wordpiece;
use tandem::metrics::{
    argmax, entities, exact_match, normalize_answer, postprocess_qa, token_f1, ConfusionMatrix,
    EntityCounts, MetricCounts, MetricKind, QaPostprocess, SquadCounts,
};

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

/// SQuAD F1 is summed in millionths: per question it is off by at most 5e-7.
fn close_fixed(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-6, "{a} != {b}");
}

// ---------------------------------------------------------------- classification

#[test]
fn accuracy_and_macro_f1_by_hand() {
    // gold = [0, 0, 0, 1, 1, 2, 2], pred = [0, 1, 0, 1, 2, 2, 0]; label 3 never occurs.
    let mut m = ConfusionMatrix::new(4);
    m.add_all(&[0, 0, 0, 1, 1, 2, 2], &[0, 1, 0, 1, 2, 2, 0])
        .unwrap();
    // Correct: (0,0) ×2, (1,1), (2,2) → 4 / 7.
    close(m.accuracy(), 4.0 / 7.0);
    // F1 = 2·tp / (gold + pred) per label:
    //   0: tp 2, gold 3, pred 3 (two 0s and the last) → 4/6 = 2/3
    //   1: tp 1, gold 2, pred 2                       → 2/4 = 1/2
    //   2: tp 1, gold 2, pred 2                       → 2/4 = 1/2
    //   3: in neither → left out of the average (sklearn infers labels from the data).
    // macro = (2/3 + 1/2 + 1/2) / 3 = 5/9 = 0.5556, as
    // sklearn.metrics.f1_score([0,0,0,1,1,2,2], [0,1,0,1,2,2,0], average="macro").
    close(m.macro_f1(), 5.0 / 9.0);
    assert_eq!(m.f1_per_label()[3], None);

    // A label only predicted counts with F1 0 (zero_division=0):
    // gold [0, 0], pred [0, 1] → label 0: 2·1/(2+1) = 2/3, label 1: 0 → macro 1/3.
    let mut m = ConfusionMatrix::new(2);
    m.add_all(&[0, 0], &[0, 1]).unwrap();
    close(m.macro_f1(), 1.0 / 3.0);
    close(m.accuracy(), 0.5);
    assert!(m.add_all(&[0], &[0, 1]).is_err());
    assert!(m.add(0, 2).is_err());

    let s = MetricCounts::Classification(m).summary();
    close(s["accuracy"], 0.5);
    close(s["macro_f1"], 1.0 / 3.0);
    close(s["examples"], 2.0);
    assert_eq!(argmax(&[0.2, 0.9, 0.1]), 1);
}

// ---------------------------------------------------------------- entities

fn spans(tags: &[&str]) -> Vec<(String, usize, usize)> {
    entities(tags)
        .into_iter()
        .map(|e| (e.kind, e.start, e.end))
        .collect()
}

#[test]
fn seqeval_entity_extraction() {
    let s = |k: &str, a, b| (k.to_string(), a, b);
    assert_eq!(
        spans(&["B-PER", "I-PER", "O", "B-LOC"]),
        [s("PER", 0, 1), s("LOC", 3, 3)]
    );
    // An I- after O starts an entity (seqeval's default, lenient mode).
    assert_eq!(spans(&["O", "I-ORG", "I-ORG", "O"]), [s("ORG", 1, 2)]);
    assert_eq!(spans(&["I-ORG"]), [s("ORG", 0, 0)]);
    // A change of type ends one entity and starts another.
    assert_eq!(spans(&["B-PER", "I-LOC"]), [s("PER", 0, 0), s("LOC", 1, 1)]);
    // B- right after B- of the same type: two entities.
    assert_eq!(spans(&["B-PER", "B-PER"]), [s("PER", 0, 0), s("PER", 1, 1)]);
    // An entity at the end of the sentence is closed.
    assert_eq!(spans(&["O", "B-LOC", "I-LOC"]), [s("LOC", 1, 2)]);
    assert!(spans(&["O", "O"]).is_empty());
}

#[test]
fn seqeval_precision_recall_f1_by_hand() {
    let sentences: [(&[&str], &[&str]); 4] = [
        // gold PER(0,1) LOC(3,3); pred the same                   → correct 2, gold 2, pred 2
        (
            &["B-PER", "I-PER", "O", "B-LOC"],
            &["B-PER", "I-PER", "O", "B-LOC"],
        ),
        // gold ORG(0,1); pred I-ORG I-ORG also gives ORG(0,1)     → correct 1, gold 1, pred 1
        (&["B-ORG", "I-ORG", "O"], &["I-ORG", "I-ORG", "O"]),
        // gold PER(0,1); pred PER(0,0) LOC(1,1) (type switch)     → correct 0, gold 1, pred 2
        (&["B-PER", "I-PER", "O"], &["B-PER", "I-LOC", "O"]),
        // gold LOC(2,3) at the end; pred LOC(2,2), too short      → correct 0, gold 1, pred 1
        (&["O", "O", "B-LOC", "I-LOC"], &["O", "O", "B-LOC", "O"]),
    ];
    let mut c = EntityCounts::default();
    for (g, p) in sentences {
        c.add_sentence(g, p).unwrap();
    }
    assert_eq!((c.correct, c.gold, c.predicted), (3, 5, 6));
    // precision 3/6, recall 3/5, F1 = 2·(1/2)(3/5) / (1/2 + 3/5) = (3/5) / (11/10) = 6/11;
    // seqeval.metrics.f1_score(gold, pred) gives 0.5454… for these lists.
    close(c.precision(), 0.5);
    close(c.recall(), 0.6);
    close(c.f1(), 6.0 / 11.0);
    // Tokens: 4/4 + 2/3 + 2/3 + 3/4 → 11/14.
    close(c.accuracy(), 11.0 / 14.0);
    assert!(c.add_sentence(&["O"], &["O", "O"]).is_err());
    let s = MetricCounts::Entities(c).summary();
    close(s["f1"], 6.0 / 11.0);
    close(s["examples"], 4.0);
    // Nothing predicted and nothing gold: all zero, no division by zero.
    let mut z = EntityCounts::default();
    z.add_sentence(&["O"], &["O"]).unwrap();
    assert_eq!((z.precision(), z.recall(), z.f1()), (0.0, 0.0, 0.0));
}

#[test]
fn entity_counts_from_label_ids_skip_ignored_positions() {
    use tandem::data::batch::IGNORE;
    use tandem::data::finetune::LabelMap;
    let names = LabelMap::from_names(["B-PER", "I-PER", "O"]).unwrap(); // ids 0, 1, 2
                                                                        // [CLS] Anna Ko ##wal flew [SEP]: sub-token and special positions carry IGNORE; the
                                                                        // prediction there (1 = I-PER on ##wal) must not count.
    let labels = [IGNORE, 0, 1, IGNORE, 2, IGNORE];
    let pred = [2, 0, 1, 1, 2, 2];
    let mut c = EntityCounts::default();
    c.add_positions(&labels, &pred, &names).unwrap();
    assert_eq!((c.correct, c.gold, c.predicted, c.tokens), (1, 1, 1, 3));
    assert!(c.add_positions(&[7], &[0], &names).is_err());
}

// ---------------------------------------------------------------- SQuAD

#[test]
fn squad_normalisation_exact_match_and_f1_by_hand() {
    assert_eq!(normalize_answer("The  Cat!"), "cat");
    assert!(exact_match("The  Cat!", "cat"));
    assert_eq!(
        normalize_answer("An apple a day, the doctor's away."),
        "apple day doctors away"
    );
    // Articles only as whole words; punctuation removal can join words.
    assert_eq!(normalize_answer("Theater anthem"), "theater anthem");
    assert_eq!(normalize_answer("rock-n-roll"), "rocknroll");
    assert_eq!(normalize_answer("Ünïcode\u{a0}TEXT"), "ünïcode text");
    assert_eq!(normalize_answer("the"), "");

    // gold {big, red, dog}, pred {red, dog, barked}: 2 shared → P = R = 2/3 → F1 2/3.
    close(token_f1("the big red dog", "red dog barked"), 2.0 / 3.0);
    // gold {new, york, city}, pred {york}: P 1, R 1/3 → F1 = 2·(1/3)/(4/3) = 1/2.
    close(token_f1("New York City", "york"), 0.5);
    // Repeated tokens count as multisets: gold {a→removed} … use words: gold [go, go, home],
    // pred [go, home, home]: shared go×1 + home×1 = 2 → P = R = 2/3.
    close(token_f1("go go home", "go home home"), 2.0 / 3.0);
    close(token_f1("", ""), 1.0);
    close(token_f1("cat", ""), 0.0);

    let mut c = SquadCounts::default();
    c.add(&["the big red dog"], "red dog barked"); // EM 0, F1 2/3
    c.add(&["Paris", "the city of Paris"], "city of Paris"); // EM 1 (second gold), F1 1
    let none: [&str; 0] = [];
    c.add(&none, ""); // unanswerable, no answer: EM 1, F1 1
    c.add(&none, "the mill"); // unanswerable, an answer: EM 0, F1 0
                              // exact = 2/4; F1 = (2/3 + 1 + 1 + 0) / 4 = 2/3;
                              // HasAns: EM 1/2, F1 (2/3 + 1)/2 = 5/6; NoAns: 1/2.
    close(c.exact_match(), 0.5);
    close_fixed(c.f1(), 2.0 / 3.0);
    close(c.has_ans_exact_match(), 0.5);
    close_fixed(c.has_ans_f1(), 5.0 / 6.0);
    close(c.no_ans_exact_match(), 0.5);
    let s = MetricCounts::Squad(c).summary();
    close(s["exact_match"], 0.5);
    close(s["no_ans_examples"], 2.0);
    // A gold answer that normalises to nothing is dropped; with none left only "" is right.
    let mut c = SquadCounts::default();
    c.add(&["The"], "");
    close(c.exact_match(), 1.0);
}

// ---------------------------------------------------------------- reducibility

/// Sums the wire vectors of two halves as an all-reduce would.
fn reduced(a: &MetricCounts, b: &MetricCounts) -> MetricCounts {
    let (va, vb) = (a.to_vec(), b.to_vec());
    let sum: Vec<f32> = va.iter().zip(&vb).map(|(x, y)| x + y).collect();
    MetricCounts::from_vec(a.kind(), &sum).unwrap()
}

#[test]
fn metrics_of_reduced_halves_equal_metrics_of_the_whole() {
    // Classification.
    let gold = [0u32, 1, 2, 2, 1, 0, 0, 2, 1, 1];
    let pred = [0u32, 2, 2, 1, 1, 0, 1, 2, 1, 0];
    let kind = MetricKind::Classification { num_labels: 3 };
    let part = |r: std::ops::Range<usize>| {
        let mut m = ConfusionMatrix::new(3);
        m.add_all(&gold[r.clone()], &pred[r]).unwrap();
        MetricCounts::Classification(m)
    };
    let whole = part(0..10);
    let sum = reduced(&part(0..4), &part(4..10));
    assert_eq!(sum, whole);
    assert_eq!(sum.summary(), whole.summary());
    assert_eq!(whole.kind(), kind);

    // Entities.
    let sents: [(&[&str], &[&str]); 4] = [
        (&["B-PER", "I-PER", "O"], &["B-PER", "I-PER", "O"]),
        (&["B-LOC", "O"], &["B-ORG", "O"]),
        (&["O", "I-ORG", "I-ORG"], &["O", "B-ORG", "I-ORG"]),
        (&["B-PER", "B-PER"], &["B-PER", "I-PER"]),
    ];
    let part = |r: std::ops::Range<usize>| {
        let mut c = EntityCounts::default();
        for (g, p) in &sents[r] {
            c.add_sentence(g, p).unwrap();
        }
        MetricCounts::Entities(c)
    };
    let whole = part(0..4);
    let sum = reduced(&part(0..1), &part(1..4));
    assert_eq!(sum, whole);
    assert_eq!(sum.summary(), whole.summary());

    // SQuAD, F1 included (fixed point: the sum is exact).
    let qs: [(&[&str], &str); 5] = [
        (&["the big red dog"], "red dog barked"),
        (&["Paris"], "Paris"),
        (&[], ""),
        (&["seven days"], "seven"),
        (&["a quick brown fox"], "brown fox jumps over"),
    ];
    let part = |r: std::ops::Range<usize>| {
        let mut c = SquadCounts::default();
        for (g, p) in &qs[r] {
            c.add(g, p);
        }
        MetricCounts::Squad(c)
    };
    let whole = part(0..5);
    let sum = reduced(&part(0..2), &part(2..5));
    assert_eq!(sum, whole);
    assert_eq!(sum.summary(), whole.summary());

    let mut m = part(0..2);
    m.merge(&part(2..5)).unwrap();
    assert_eq!(m, whole);
    assert!(m.merge(&MetricCounts::new(MetricKind::Entities)).is_err());
    assert!(MetricCounts::from_vec(kind, &[0.0; 5]).is_err());
}

// ---------------------------------------------------------------- QA post-processing

/// One window: [CLS] q [SEP] c0 c1 c2 c3 [SEP], context "aa bb cc dd".
fn toy() -> (QaExample, QaFeature) {
    let e = QaExample {
        id: "toy".into(),
        question: "q".into(),
        context: "aa bb cc dd".into(),
        answers: vec![("bb cc".into(), 3)],
        is_impossible: false,
    };
    let f = QaFeature {
        example_index: 0,
        input_ids: vec![2, 9, 3, 10, 11, 12, 13, 3],
        token_type_ids: vec![0, 0, 0, 1, 1, 1, 1, 1],
        offsets: vec![
            None,
            None,
            None,
            Some((0, 2)),
            Some((3, 5)),
            Some((6, 8)),
            Some((9, 11)),
            None,
        ],
        start_position: 4,
        end_position: 5,
    };
    (e, f)
}

#[test]
fn postprocess_picks_the_best_valid_span() {
    let (e, f) = toy();
    // Best start is the question token (1) and best end is before the best start:
    // both invalid. Next: start 4 (bb) + end 5 (cc) = 5 + 4.
    let start = vec![0.0, 9.0, 0.0, 0.5, 5.0, 0.0, 0.0, 0.0];
    let end = vec![0.0, 0.0, 0.0, 8.0, 0.0, 4.0, 1.0, 0.0];
    let opts = QaPostprocess::default();
    let (es, fs) = (vec![e], vec![f]);
    let run = |s: &[f32], t: &[f32], o: &QaPostprocess| {
        postprocess_qa(&es, &fs, &[s.to_vec()], &[t.to_vec()], o).unwrap()
    };
    let p = run(&start, &end, &opts);
    assert_eq!(p[0].text, "bb cc");
    assert_eq!(p[0].score, Some(9.0));
    // max_answer_length 1: only single-token spans; best is (3, 3) "aa" = 0.5 + 8.
    let one = QaPostprocess {
        max_answer_length: 1,
        ..opts
    };
    assert_eq!(run(&start, &end, &one)[0].text, "aa");
    // v2.0: [CLS] score 20 beats the best span (9) by more than 0 → no answer.
    let v2 = QaPostprocess {
        version_2_with_negative: true,
        ..opts
    };
    let mut s2 = start.clone();
    s2[0] = 10.0;
    let mut e2 = end.clone();
    e2[0] = 10.0;
    let p = run(&s2, &e2, &v2);
    assert_eq!(p[0].text, "");
    assert_eq!(p[0].null_score_diff, Some(11.0));
    let p = run(&start, &end, &v2);
    assert_eq!(
        (p[0].text.as_str(), p[0].null_score_diff),
        ("bb cc", Some(-9.0))
    );
    assert!(postprocess_qa(&es, &fs, &[], &[], &opts).is_err());
}

#[test]
fn oracle_logits_on_bundled_dev_score_full_marks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/data");
    let files: Vec<PathBuf> = vec![root.join("corpus/en.txt"), root.join("corpus/ko.txt")];
    let tok = train_wordpiece(&files, 3000, true, Some(false), 1).unwrap();
    let dev = QaSet::read(&root.join("qa/dev.json")).unwrap();
    let opts = QaOptions {
        max_seq_length: 96,
        doc_stride: 24,
        max_query_length: 32,
    };
    let features = dev.featurize(&tok, &opts).unwrap();
    // Logits that put 10 on the labelled start and end (on [CLS] where the window has no
    // answer), 0 elsewhere.
    let (mut starts, mut ends) = (Vec::new(), Vec::new());
    for f in &features {
        let mut s = vec![0.0f32; f.input_ids.len() + 3]; // padding positions are ignored
        let mut t = s.clone();
        s[f.start_position as usize] = 10.0;
        t[f.end_position as usize] = 10.0;
        starts.push(s);
        ends.push(t);
    }
    let post = QaPostprocess {
        version_2_with_negative: true,
        ..QaPostprocess::default()
    };
    let preds = postprocess_qa(&dev.examples, &features, &starts, &ends, &post).unwrap();
    let mut c = SquadCounts::default();
    c.add_predictions(&dev.examples, &preds).unwrap();
    assert_eq!(c.total, 33);
    assert_eq!(c.no_ans_total(), 4);
    // English answers are whole words: exact. Korean ones may carry a particle in the same
    // word piece, so the exact-match count allows those.
    let english: Vec<_> = dev
        .examples
        .iter()
        .zip(&preds)
        .filter(|(e, _)| !(e.id.starts_with("dev-008") || e.id.starts_with("dev-009")))
        .collect();
    for (e, p) in &english {
        let gold: Vec<&str> = e.answers.iter().map(|(t, _)| t.as_str()).collect();
        let want = gold.first().copied().unwrap_or("");
        assert!(
            exact_match(want, &p.text),
            "{}: {:?} vs {want:?}",
            e.id,
            p.text
        );
    }
    close(c.no_ans_exact_match(), 1.0);
    assert!(c.exact_match() >= (english.len() as f64) / 33.0);
    assert!(c.add_predictions(&dev.examples, &preds[1..]).is_err());
}
