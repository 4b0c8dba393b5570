//! Pre-training instances (statistics over a real-sized sample, structure, resume), collation,
//! the WordPiece tokenizer (English and Korean) and the data benchmark.

mod common;

use std::path::{Path, PathBuf};

use rand::Rng;
use tandem::data::batch::IGNORE;
use tandem::data::corpus::CorpusOptions;
use tandem::data::instances::{
    bench_data, collate, instances_for_shard, BenchDataOptions, Cursor, Instance, InstanceOptions,
    InstanceStream, VocabInfo,
};
use tandem::data::shard::build_index;
use tandem::data::tokenizer::{train_wordpiece, Specials, Tokenizer};

const VOCAB: usize = 1000;

fn tmpdir(name: &str) -> common::TmpDir {
    common::TmpDir::new("inst", name)
}

fn vocab() -> VocabInfo {
    VocabInfo::new(Specials::TRAINED, VOCAB)
}

/// Random tokenized documents: 2..30 sentences of 3..40 non-special ids.
fn random_docs(n: usize, seed: u64) -> Vec<Vec<Vec<u32>>> {
    let mut rng = tandem::util::rng(&[seed]);
    (0..n)
        .map(|_| {
            (0..rng.random_range(2..30))
                .map(|_| {
                    (0..rng.random_range(3..40))
                        .map(|_| rng.random_range(5..VOCAB as u32))
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Original token ids of an instance (labels where masked).
fn originals(i: &Instance) -> Vec<u32> {
    i.input_ids
        .iter()
        .zip(&i.mlm_labels)
        .map(|(&t, &l)| if l == IGNORE { t } else { l as u32 })
        .collect()
}

fn check_structure(inst: &Instance, opts: &InstanceOptions, s: &Specials) {
    let n = inst.input_ids.len();
    assert!(n <= opts.max_seq_length, "{n} tokens");
    assert_eq!(inst.segment_ids.len(), n);
    assert_eq!(inst.mlm_labels.len(), n);
    let seps: Vec<usize> = (0..n).filter(|&i| inst.input_ids[i] == s.sep).collect();
    assert_eq!(inst.input_ids[0], s.cls);
    assert_eq!(seps.len(), 2, "{:?}", inst.input_ids);
    assert_eq!(seps[1], n - 1);
    assert!(seps[0] >= 2 && seps[1] >= seps[0] + 2, "A and B non-empty");
    for (i, &seg) in inst.segment_ids.iter().enumerate() {
        assert_eq!(seg, (i > seps[0]) as u32, "segment id at {i}");
    }
    for (i, &l) in inst.mlm_labels.iter().enumerate() {
        if l != IGNORE {
            assert!(!s.contains(l as u32), "special token {l} masked at {i}");
            assert!(!s.contains(inst.input_ids[i]) || inst.input_ids[i] == s.mask);
        } else {
            assert_ne!(inst.input_ids[i], s.mask);
        }
    }
}

#[test]
fn masking_and_nsp_statistics_match_bert() {
    let s = Specials::TRAINED;
    // No cap: the masked share must be 15% of the maskable tokens.
    let uncapped = InstanceOptions {
        max_predictions_per_seq: 10_000,
        ..InstanceOptions::default()
    };
    let (mut maskable, mut masked, mut as_mask, mut kept, mut random) = (0usize, 0, 0, 0, 0);
    let (mut instances, mut is_next) = (0usize, 0usize);
    for shard in 0..12u32 {
        let docs = random_docs(300, shard as u64);
        for inst in instances_for_shard(&docs, &uncapped, &vocab(), 7, 0, shard) {
            check_structure(&inst, &uncapped, &s);
            instances += 1;
            is_next += !inst.is_random_next as usize;
            let m = inst.input_ids.len() - 3;
            let k = inst.mlm_labels.iter().filter(|&&l| l != IGNORE).count();
            assert_eq!(
                k,
                ((m as f64 * 0.15).round() as usize).max(1),
                "mask count of one instance"
            );
            maskable += m;
            masked += k;
            for (&t, &l) in inst.input_ids.iter().zip(&inst.mlm_labels) {
                if l == IGNORE {
                    continue;
                }
                if t == s.mask {
                    as_mask += 1;
                } else if t as i64 == l {
                    kept += 1;
                } else {
                    assert!((t as usize) < VOCAB && !s.contains(t));
                    random += 1;
                }
            }
        }
    }
    let frac = |a: usize, b: usize| a as f64 / b as f64;
    let (mf, mk, kp, rn, nx) = (
        frac(masked, maskable),
        frac(as_mask, masked),
        frac(kept, masked),
        frac(random, masked),
        frac(is_next, instances),
    );
    eprintln!(
        "instances {instances}, masked {masked} of {maskable} maskable = {mf:.4}; \
         [MASK] {mk:.4}, kept {kp:.4}, random {rn:.4}; IsNext {nx:.4}"
    );
    assert!(
        masked >= 20_000 && instances >= 8_000,
        "{masked} masked, {instances} instances"
    );
    assert!((mf - 0.15).abs() <= 0.01, "masked fraction {mf}");
    assert!((mk - 0.8).abs() <= 0.02, "[MASK] share {mk}");
    assert!((kp - 0.1).abs() <= 0.02, "unchanged share {kp}");
    assert!((rn - 0.1).abs() <= 0.02, "random share {rn}");
    assert!((nx - 0.5).abs() <= 0.02, "IsNext share {nx}");

    // Default cap of 20 per sequence.
    let opts = InstanceOptions::default();
    let mut lengths = Vec::new();
    let (mut maskable, mut masked) = (0, 0);
    for inst in instances_for_shard(&random_docs(400, 99), &opts, &vocab(), 7, 0, 0) {
        check_structure(&inst, &opts, &s);
        let k = inst.mlm_labels.iter().filter(|&&l| l != IGNORE).count();
        let m = inst.input_ids.len() - 3;
        assert_eq!(k, ((m as f64 * 0.15).round() as usize).clamp(1, 20));
        lengths.push(inst.input_ids.len());
        (maskable, masked) = (maskable + m, masked + k);
    }
    let mf = frac(masked, maskable);
    eprintln!(
        "default options: {} instances, masked {masked} of {maskable} = {mf:.4}",
        lengths.len()
    );
    assert!(
        masked >= 20_000 && (mf - 0.15).abs() <= 0.01,
        "masked fraction {mf}"
    );
    // short_seq_prob gives some short targets; most instances fill the length.
    let full = lengths.iter().filter(|&&l| l >= 120).count() as f64 / lengths.len() as f64;
    eprintln!("{full:.3} of instances have ≥ 120 tokens");
    assert!(full > 0.4, "{full}");
    assert!(lengths.iter().any(|&l| l < 64));
}

#[test]
fn b_is_the_continuation_or_from_another_document() {
    // Document d only uses ids 5 + 20 d .. 5 + 20 (d + 1): an id tells its document.
    let mut rng = tandem::util::rng(&[3]);
    let docs: Vec<Vec<Vec<u32>>> = (0..40u32)
        .map(|d| {
            (0..rng.random_range(1..12))
                .map(|_| {
                    (0..rng.random_range(1..30))
                        .map(|_| 5 + 20 * d + rng.random_range(0..20))
                        .collect()
                })
                .collect()
        })
        .collect();
    let doc_of = |t: u32| (t - 5) / 20;
    let opts = InstanceOptions {
        masked_lm_prob: 0.0,
        max_seq_length: 64,
        ..InstanceOptions::default()
    };
    let v = VocabInfo::new(Specials::TRAINED, 5 + 20 * 40);
    let all = instances_for_shard(&docs, &opts, &v, 1, 2, 3);
    assert!(all.len() > 100);
    for inst in &all {
        check_structure(inst, &opts, &Specials::TRAINED);
        assert!(inst.mlm_labels.iter().all(|&l| l == IGNORE));
        let sep = inst.input_ids.iter().position(|&t| t == 3).unwrap();
        let a: Vec<u32> = inst.input_ids[1..sep].iter().map(|&t| doc_of(t)).collect();
        let b: Vec<u32> = inst.input_ids[sep + 1..inst.input_ids.len() - 1]
            .iter()
            .map(|&t| doc_of(t))
            .collect();
        assert!(a.iter().all(|&d| d == a[0]), "A from one document");
        assert!(b.iter().all(|&d| d == b[0]), "B from one document");
        assert_eq!(a[0] == b[0], !inst.is_random_next, "{inst:?}");
    }
    // Every document is the A side of some instance.
    let mut seen = [false; 40];
    for inst in &all {
        seen[doc_of(inst.input_ids[1]) as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn same_shard_same_instances_and_resume_is_exact() {
    let opts = InstanceOptions::default();
    let shards: Vec<Vec<Vec<Vec<u32>>>> = (0..4)
        .map(|i| random_docs(20 + 5 * i, 100 + i as u64))
        .collect();
    let a = instances_for_shard(&shards[1], &opts, &vocab(), 5, 2, 1);
    assert_eq!(a, instances_for_shard(&shards[1], &opts, &vocab(), 5, 2, 1));
    assert_ne!(
        a,
        instances_for_shard(&shards[1], &opts, &vocab(), 5, 3, 1),
        "epoch changes masks"
    );
    assert_ne!(
        a,
        instances_for_shard(&shards[1], &opts, &vocab(), 5, 2, 2),
        "shard id changes masks"
    );

    let plan = vec![2u32, 0, 3, 1];
    let stream = |start: Option<Cursor>| {
        let shards = shards.clone();
        InstanceStream::new(
            plan.clone(),
            start,
            move |id| Ok(shards[id as usize].clone()),
            opts.clone(),
            vocab(),
            5,
            2,
        )
        .unwrap()
    };
    let all: Vec<Instance> = stream(None).map(|r| r.unwrap()).collect();
    let expected: Vec<Instance> = plan
        .iter()
        .flat_map(|&id| instances_for_shard(&shards[id as usize], &opts, &vocab(), 5, 2, id))
        .collect();
    assert_eq!(all, expected);
    let first_len = instances_for_shard(&shards[2], &opts, &vocab(), 5, 2, 2).len();
    for k in [
        0,
        1,
        17,
        first_len - 1,
        first_len,
        first_len + 3,
        all.len() - 1,
        all.len(),
    ] {
        let mut s = stream(None);
        let head: Vec<Instance> = s.by_ref().take(k).map(|r| r.unwrap()).collect();
        assert_eq!(head, all[..k]);
        let cursor = s.position();
        if k == all.len() {
            assert_eq!(cursor, None);
            continue;
        }
        let c = cursor.unwrap();
        // The cursor survives a checkpoint as JSON.
        let c: Cursor = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        let rest: Vec<Instance> = stream(Some(c)).map(|r| r.unwrap()).collect();
        assert_eq!(rest, all[k..], "resume after {k} instances at {c:?}");
    }
    // A cursor outside the plan, or past the shard's end, is refused.
    let bad = Cursor {
        shard_id: 9,
        instance: 0,
    };
    let r = InstanceStream::new(
        plan.clone(),
        Some(bad),
        |_| Ok(vec![]),
        opts.clone(),
        vocab(),
        5,
        2,
    );
    assert!(r.err().unwrap().to_string().contains("shard 9"));
    let past = Cursor {
        shard_id: 2,
        instance: 1_000_000,
    };
    let e = stream(Some(past)).next().unwrap().unwrap_err().to_string();
    assert!(e.contains("resume cursor"), "{e}");
}

#[test]
fn whole_word_masking_masks_all_pieces_of_a_word() {
    // Ids 500.. are `##` continuation pieces.
    let mut v = vocab();
    v.continues_word = (0..VOCAB).map(|i| i >= 500).collect();
    let opts = InstanceOptions {
        whole_word_mask: true,
        ..InstanceOptions::default()
    };
    let mut rng = tandem::util::rng(&[11]);
    let docs: Vec<Vec<Vec<u32>>> = (0..200)
        .map(|_| {
            (0..rng.random_range(2..20))
                .map(|_| {
                    let mut s = Vec::new();
                    for _ in 0..rng.random_range(2..12) {
                        s.push(rng.random_range(5..500));
                        for _ in 0..rng.random_range(0..3) {
                            s.push(rng.random_range(500..VOCAB as u32));
                        }
                    }
                    s
                })
                .collect()
        })
        .collect();
    let mut words = 0;
    for inst in instances_for_shard(&docs, &opts, &v, 1, 0, 0) {
        check_structure(&inst, &opts, &Specials::TRAINED);
        let orig = originals(&inst);
        let masked = |i: usize| inst.mlm_labels[i] != IGNORE;
        for i in 1..orig.len() {
            let cont = orig[i] >= 500 && !Specials::TRAINED.contains(orig[i]);
            if cont && !Specials::TRAINED.contains(orig[i - 1]) {
                assert_eq!(masked(i), masked(i - 1), "piece {i} split from its word");
            }
            if masked(i) && !cont {
                words += 1;
            }
        }
        assert!(inst.mlm_labels.iter().filter(|&&l| l != IGNORE).count() <= 20);
    }
    assert!(words > 1000, "{words}");
}

#[test]
fn collate_pads_and_labels() {
    let opts = InstanceOptions {
        max_seq_length: 32,
        ..InstanceOptions::default()
    };
    let inst = instances_for_shard(&random_docs(10, 5), &opts, &vocab(), 0, 0, 0);
    let batch = &inst[..4];
    let longest = batch.iter().map(|i| i.input_ids.len()).max().unwrap();
    for (pad_to, seq) in [(None, longest), (Some(40), 40)] {
        let b = collate(batch, pad_to, 0).unwrap();
        assert_eq!((b.batch, b.seq), (4, seq));
        for (r, i) in batch.iter().enumerate() {
            let row = r * seq..(r + 1) * seq;
            let n = i.input_ids.len();
            assert_eq!(&b.input_ids[row.start..row.start + n], &i.input_ids[..]);
            assert!(b.input_ids[row.start + n..row.end].iter().all(|&t| t == 0));
            assert_eq!(
                b.attention_mask[row.clone()].iter().sum::<u32>() as usize,
                n
            );
            assert_eq!(
                &b.token_type_ids[row.start..row.start + n],
                &i.segment_ids[..]
            );
            assert!(b.mlm_labels[row.start + n..row.end]
                .iter()
                .all(|&l| l == IGNORE));
            assert_eq!(b.nsp_labels[r], i.is_random_next as u32);
        }
        assert_eq!(
            b.mlm_count(),
            batch
                .iter()
                .map(|i| i.mlm_labels.iter().filter(|&&l| l != IGNORE).count())
                .sum::<usize>()
        );
    }
    assert!(collate(batch, Some(5), 0)
        .unwrap_err()
        .to_string()
        .contains("more than pad_to"));
    assert!(collate(&[], None, 0).is_err());
    assert!(InstanceOptions {
        max_seq_length: 4,
        ..opts
    }
    .validate()
    .is_err());
}

// ---------------------------------------------------------------- tokenizer

const KOREAN: &str = "나는 오늘 라면을 먹었다.";

fn bilingual_corpus(dir: &Path) -> Vec<PathBuf> {
    let english = "The quick brown fox jumps over the lazy dog.\nTokenizers split words into pieces.\n\n\
                   Distributed training averages gradients across workers.\nThe workers exchange gradients.\n\n";
    let korean = "나는 오늘 라면을 먹었다.\n오늘 날씨가 좋다.\n\n나는 학교에 갔다.\n라면을 먹고 학교에 갔다.\n";
    let a = dir.join("en.txt");
    std::fs::write(&a, english.repeat(20)).unwrap();
    let b = dir.join("ko.jsonl");
    let rec = serde_json::json!({ "text": korean }).to_string() + "\n";
    std::fs::write(&b, rec.repeat(20)).unwrap();
    vec![a, b]
}

#[test]
fn wordpiece_trains_on_english_and_korean_and_round_trips() {
    let d = tmpdir("tok");
    let files = bilingual_corpus(&d);
    let tok = train_wordpiece(&files, 400, true, Some(false), 1).unwrap();
    assert_eq!(tok.specials(), Specials::TRAINED);
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .enumerate()
    {
        assert_eq!(tok.id_to_token(i as u32).as_deref(), Some(*t));
    }
    let (ids, tokens) = tok.encode_with_specials(KOREAN).unwrap();
    eprintln!("{KOREAN} -> {tokens:?}");
    assert_eq!(ids.first(), Some(&tok.cls_id()));
    assert_eq!(ids.last(), Some(&tok.sep_id()));
    assert!(ids.len() > 3 && !ids.contains(&tok.unk_id()), "{tokens:?}");
    assert!(tokens.iter().any(|t| t.contains("라면")), "{tokens:?}");
    let en = tok.encode("The QUICK fox exchanges gradients").unwrap();
    assert!(!en.is_empty() && !en.contains(&tok.unk_id()));
    assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());

    // save → load (directory, tokenizer.json, vocab.txt) gives the same ids.
    let out = d.join("saved");
    tok.save(&out).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["do_lower_case"], true);
    assert_eq!(config["tokenizer_class"], "BertTokenizer");
    let vocab_txt = std::fs::read_to_string(out.join("vocab.txt")).unwrap();
    assert_eq!(vocab_txt.lines().count(), tok.vocab_size());
    assert!(vocab_txt.starts_with("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"));
    let from_json = Tokenizer::from_json(&tok.to_json().unwrap()).unwrap();
    let loaded = [
        Tokenizer::load(&out).unwrap(),
        Tokenizer::load(&out.join("tokenizer.json")).unwrap(),
        Tokenizer::load(&out.join("vocab.txt")).unwrap(),
        from_json,
    ];
    for t in &loaded {
        assert_eq!(t.vocab_size(), tok.vocab_size());
        assert_eq!(t.specials(), tok.specials());
        for text in [KOREAN, "The quick brown fox, jumps!", "workers' gradients"] {
            assert_eq!(
                t.encode_with_specials(text).unwrap(),
                tok.encode_with_specials(text).unwrap(),
                "{text}"
            );
        }
    }
    // Default accent handling (follows lowercase: Hangul decomposed) still knows every piece.
    let nfd = train_wordpiece(&files, 400, true, None, 1).unwrap();
    let ids = nfd.encode(KOREAN).unwrap();
    assert!(!ids.is_empty() && !ids.contains(&nfd.unk_id()));
}

#[test]
fn vocab_txt_loads_with_bert_pipeline_and_missing_specials_are_named() {
    let d = tmpdir("vocab");
    let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n##s\nworld\n!\n";
    std::fs::write(d.join("vocab.txt"), vocab).unwrap();
    let t = Tokenizer::load(&d).unwrap();
    assert_eq!(t.vocab_size(), 9);
    assert_eq!(t.encode("Hellos WORLD!").unwrap(), vec![5, 6, 7, 8]);
    assert_eq!(t.encode("hello unknown").unwrap(), vec![5, 1]);
    let (ids, toks) = t.encode_with_specials("hello").unwrap();
    assert_eq!(
        (ids, toks),
        (
            vec![2, 5, 3],
            vec!["[CLS]".into(), "hello".into(), "[SEP]".into()]
        )
    );
    // Cased per tokenizer_config.json, or per the explicit override.
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"do_lower_case": false}"#,
    )
    .unwrap();
    assert_eq!(
        Tokenizer::load(&d).unwrap().encode("Hello").unwrap(),
        vec![1]
    );
    assert_eq!(
        Tokenizer::load_with(&d.join("vocab.txt"), Some(true))
            .unwrap()
            .encode("Hello")
            .unwrap(),
        vec![5]
    );

    std::fs::write(d.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n").unwrap();
    let e = Tokenizer::load(&d).unwrap_err().to_string();
    assert!(
        e.contains("vocab.txt") && e.contains("lacks the special token [MASK]"),
        "{e}"
    );
    let e = Tokenizer::load(&tmpdir("nothing")).unwrap_err().to_string();
    assert!(e.contains("neither tokenizer.json nor vocab.txt"), "{e}");
}

#[test]
fn pipeline_from_files_to_batches() {
    let d = tmpdir("bench");
    let files = bilingual_corpus(&d);
    let tok = train_wordpiece(&files, 400, true, Some(false), 1).unwrap();
    let opts = BenchDataOptions {
        shard_bytes: 2000,
        ..BenchDataOptions::default()
    };
    let r = bench_data(&files, &tok, &opts).unwrap();
    eprintln!("{r:?}");
    let index = build_index(&files, 2000, &CorpusOptions::default()).unwrap();
    assert_eq!(r.shards, index.shards.len());
    assert!(r.shards > 1);
    assert_eq!(r.documents, 60);
    assert!(r.tokens > 500 && r.instances > 50 && r.masked > r.instances);
    // Workers reproduce instances from shard bytes alone.
    let v = VocabInfo::from_tokenizer(&tok);
    let s = &index.shards[1];
    let docs = tok
        .encode_documents(&index.parse_shard(1, &index.read_shard(1).unwrap()).unwrap())
        .unwrap();
    let inst = instances_for_shard(&docs, &InstanceOptions::default(), &v, 0, 0, s.id);
    assert!(!inst.is_empty());
    for i in &inst {
        check_structure(i, &InstanceOptions::default(), &tok.specials());
    }
}
