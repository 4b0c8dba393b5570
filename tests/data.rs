//! Corpus parsing and sharding: hostile input, shard invariants (property tests), epoch plans.

mod common;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tandem::data::corpus::{
    parse_documents, resolve_inputs, CorpusOptions, Document, DocumentReader, ErrorPolicy, Format,
};
use tandem::data::shard::{build_index, plan_epoch, verify_shard_bytes, ShardIndex};

fn tmpdir(name: &str) -> common::TmpDir {
    common::TmpDir::new("data", name)
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, bytes).unwrap();
    p
}

fn skip() -> CorpusOptions {
    CorpusOptions {
        on_error: ErrorPolicy::Skip,
        ..CorpusOptions::default()
    }
}

fn docs(v: &[&[&str]]) -> Vec<Document> {
    v.iter()
        .map(|d| d.iter().map(|s| s.to_string()).collect())
        .collect()
}

/// Every document of the index, shard by shard, read back through the shards' bytes.
fn docs_via_shards(index: &ShardIndex) -> Vec<Document> {
    let mut out = Vec::new();
    for s in &index.shards {
        let bytes = index.read_shard(s.id).unwrap();
        verify_shard_bytes(s, &bytes).unwrap();
        let d = index.parse_shard(s.id, &bytes).unwrap();
        assert_eq!(d.len() as u64, s.documents);
        assert!(d.len() >= 2, "shard {} holds {} document(s)", s.id, d.len());
        out.extend(d);
    }
    out
}

fn err_of<T: std::fmt::Debug>(r: tandem::Result<T>) -> String {
    r.unwrap_err().to_string()
}

// ---------------------------------------------------------------- parsing hostile input

#[test]
fn text_format_documents_crlf_and_bom() {
    let d = tmpdir("crlf");
    let bytes = b"\xEF\xBB\xBFFirst sentence.\r\n  Second one.  \r\n\r\n \t \r\nOther doc.\r\nlast";
    let p = write(&d, "a.txt", bytes);
    let want = docs(&[&["First sentence.", "Second one."], &["Other doc.", "last"]]);
    let opts = CorpusOptions::default();
    assert_eq!(
        parse_documents(bytes, Format::Text, &opts, "net").unwrap(),
        want
    );
    let read: Vec<_> = DocumentReader::new(vec![p.clone()], opts.clone())
        .map(|d| d.unwrap())
        .collect();
    assert_eq!(read, want);
    let index = build_index(&[p], 1 << 20, &opts).unwrap();
    assert_eq!(docs_via_shards(&index), want);
    assert_eq!(index.stats.documents, 2);
    assert_eq!(index.stats.sentences, 4);
}

#[test]
fn jsonl_documents_bom_and_multiline_text() {
    let bytes = "\u{feff}{\"text\": \"One.\\nTwo.\\r\\n\\nThree.\", \"id\": 7}\n\n{\"text\": \"  \"}\r\n{\"text\": \"Solo\"}\r\n";
    let got = parse_documents(
        bytes.as_bytes(),
        Format::Jsonl,
        &CorpusOptions::default(),
        "j",
    )
    .unwrap();
    assert_eq!(got, docs(&[&["One.", "Two.", "Three."], &["Solo"]]));
    assert_eq!(Format::from_path(Path::new("x/y.JSONL")), Format::Jsonl);
    assert_eq!(Format::from_path(Path::new("x/y.json")), Format::Jsonl);
    assert_eq!(Format::from_path(Path::new("x/wiki_00")), Format::Text);
}

#[test]
fn invalid_utf8_names_file_and_line_or_is_skipped() {
    let d = tmpdir("utf8");
    let bytes = b"good one\ngood two\nbad \xFF\xFE here\n\nnext doc\n";
    let p = write(&d, "bad.txt", bytes);
    let e = err_of(build_index(&[&p], 1 << 20, &CorpusOptions::default()));
    assert!(
        e.contains("bad.txt:3:") && e.contains("invalid UTF-8"),
        "{e}"
    );
    let e = err_of(parse_documents(
        bytes,
        Format::Text,
        &CorpusOptions::default(),
        "remote",
    ));
    assert!(e.starts_with("remote:3: invalid UTF-8"), "{e}");

    let index = build_index(&[&p], 1 << 20, &skip()).unwrap();
    assert_eq!(index.stats.skipped_lines, 1);
    assert_eq!(
        docs_via_shards(&index),
        docs(&[&["good one", "good two"], &["next doc"]])
    );
}

#[test]
fn lines_over_the_limit_fail_or_are_skipped() {
    let d = tmpdir("long");
    let huge = "x".repeat(100_000);
    let text = format!("a\nb\n\nc1\n\n{huge}\nc\n\nd\n\ne\n");
    let p = write(&d, "long.txt", &text);
    let opts = CorpusOptions {
        max_line_bytes: 1000,
        ..CorpusOptions::default()
    };
    let e = err_of(build_index(&[&p], 1 << 20, &opts));
    assert!(
        e.contains("long.txt:6:") && e.contains("100000 bytes, over the limit of 1000"),
        "{e}"
    );
    let opts = CorpusOptions {
        on_error: ErrorPolicy::Skip,
        ..opts
    };
    // A small target cuts shards around the skipped line: its bytes must still be hashed.
    for target in [1, 5, 1 << 20] {
        let index = build_index(&[&p], target, &opts).unwrap();
        assert_eq!(index.stats.skipped_lines, 1);
        let want = docs(&[&["a", "b"], &["c1"], &["c"], &["d"], &["e"]]);
        assert_eq!(docs_via_shards(&index), want);
        let total: u64 = index.shards.iter().map(|s| s.bytes).sum();
        assert_eq!(total, text.len() as u64);
    }
    // A line of exactly the limit, with CRLF, is accepted.
    let exact = format!("{}\r\nx\n\ny\n", "z".repeat(1000));
    let got = parse_documents(
        exact.as_bytes(),
        Format::Text,
        &CorpusOptions {
            max_line_bytes: 1000,
            ..CorpusOptions::default()
        },
        "e",
    )
    .unwrap();
    assert_eq!(got[0][0].len(), 1000);
}

#[test]
fn malformed_jsonl_and_missing_text_name_the_line() {
    let d = tmpdir("jsonl");
    let p = write(
        &d,
        "c.jsonl",
        "{\"text\": \"ok\"}\n{\"text\": \"broken\"\n{\"text\": \"fine\"}\n",
    );
    let e = err_of(build_index(&[&p], 1 << 20, &CorpusOptions::default()));
    assert!(e.contains("c.jsonl:2: invalid JSON"), "{e}");
    let q = write(
        &d,
        "d.jsonl",
        "{\"text\": \"ok\"}\n\n{\"body\": \"no text\"}\n{\"text\": 5}\n",
    );
    let e = err_of(build_index(&[&q], 1 << 20, &CorpusOptions::default()));
    assert!(
        e.contains("d.jsonl:3: expected a JSON object with a string field \"text\""),
        "{e}"
    );
    let r = write(&d, "e.jsonl", "[1, 2]\n");
    let e = err_of(parse_documents(
        &std::fs::read(&r).unwrap(),
        Format::Jsonl,
        &CorpusOptions::default(),
        "e.jsonl",
    ));
    assert!(e.contains("e.jsonl:1: expected a JSON object"), "{e}");

    let index = build_index(&[&p, &q], 1 << 20, &skip()).unwrap();
    assert_eq!(index.stats.skipped_records, 3);
    assert_eq!(
        docs_via_shards(&index),
        docs(&[&["ok"], &["fine"], &["ok"]])
    );
}

#[test]
fn empty_inputs_and_one_document_are_clear_errors() {
    let d = tmpdir("empty");
    let e = err_of(resolve_inputs(&[&d]));
    assert!(e.contains("no corpus files"), "{e}");
    let e = err_of(resolve_inputs(&[d.join("missing.txt")]));
    assert!(e.contains("missing.txt: no such file"), "{e}");
    let e = err_of(resolve_inputs(&[d.join("*.nothing")]));
    assert!(e.contains("matches no file"), "{e}");

    write(&d, "a.txt", "");
    write(&d, "b.txt", "\n\n  \r\n");
    let e = err_of(build_index(&[&d], 100, &CorpusOptions::default()));
    assert!(e.contains("empty corpus"), "{e}");
    write(&d, "c.txt", "just one\ndocument here\n");
    let e = err_of(build_index(&[&d], 100, &CorpusOptions::default()));
    assert!(e.contains("NSP needs at least two documents"), "{e}");
    write(&d, "d.jsonl", "{\"text\": \"second\"}\n");
    let index = build_index(&[&d], 1, &CorpusOptions::default()).unwrap();
    assert_eq!(index.shards.len(), 1);
    // b.txt's blank lines ride along with the next document; the empty a.txt has no range.
    assert_eq!(index.shards[0].ranges.len(), 3, "{:?}", index.shards[0]);
    assert_eq!(
        docs_via_shards(&index),
        docs(&[&["just one", "document here"], &["second"]])
    );
}

#[test]
fn inputs_resolve_dirs_recursively_and_globs_sorted() {
    let d = tmpdir("resolve");
    write(&d, "b/z.txt", "z\n");
    write(&d, "b/deep/y.jsonl", "{\"text\": \"y\"}\n");
    write(&d, "a.txt", "a\n");
    write(&d, ".hidden.txt", "h\n");
    write(&d, "b/.index.json", "{}\n");
    let got = resolve_inputs(&[&d]).unwrap();
    let names: Vec<_> = got
        .iter()
        .map(|p| {
            p.strip_prefix(d.canonicalize().unwrap())
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        vec![
            PathBuf::from("a.txt"),
            "b/deep/y.jsonl".into(),
            "b/z.txt".into()
        ]
    );
    let pat = format!("{}/b/*.txt", d.display());
    let got = resolve_inputs(&[pat.clone(), d.join("a.txt").display().to_string(), pat]).unwrap();
    assert_eq!(got.len(), 2);
    assert!(got[0].ends_with("a.txt") && got[1].ends_with("b/z.txt"));
}

// ---------------------------------------------------------------- index, checksums, files

fn small_corpus(dir: &Path, docs: usize) -> Vec<PathBuf> {
    let mut text = String::new();
    for i in 0..docs {
        text.push_str(&format!(
            "Document {i} starts here.\nIt has a second sentence, {i}.\n\n"
        ));
    }
    let half = text.len() / 2;
    let cut = text[..half].rfind("\n\n").unwrap() + 2;
    vec![
        write(dir, "part1.txt", &text[..cut]),
        write(dir, "part2.txt", &text[cut..]),
    ]
}

#[test]
fn index_is_reproducible_saved_atomically_and_detects_changes() {
    let d = tmpdir("index");
    let files = small_corpus(&d, 40);
    let opts = CorpusOptions::default();
    let a = build_index(&files, 300, &opts).unwrap();
    let b = build_index(&[&d], 300, &opts).unwrap();
    assert_eq!(a, b, "same corpus, same index");
    assert!(a.shards.len() > 3);
    assert!(a.same_inputs(&resolve_inputs(&files).unwrap(), 300));
    assert!(!a.same_inputs(&resolve_inputs(&files).unwrap(), 301));
    assert_eq!(a.total_documents(), 40);
    let path = d.join("state/index.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    a.save(&path).unwrap();
    assert_eq!(ShardIndex::load(&path).unwrap(), a);
    a.verify_unchanged().unwrap();

    // Same size, different content: caught by the checksum, naming the file.
    let original = std::fs::read(&files[1]).unwrap();
    let mut changed = original.clone();
    changed[5] ^= 0x01;
    std::fs::write(&files[1], &changed).unwrap();
    let e = err_of(a.verify_unchanged());
    assert!(e.contains("part2.txt") && e.contains("SHA-256"), "{e}");
    let touched = a
        .shards
        .iter()
        .find(|s| {
            s.ranges
                .iter()
                .any(|r| r.file == 1 && r.start <= 5 && 5 < r.end)
        })
        .unwrap();
    let e = err_of(a.read_shard(touched.id));
    assert!(
        e.contains(&format!("shard {}: checksum mismatch", touched.id)),
        "{e}"
    );
    std::fs::write(&files[1], &original[..original.len() - 1]).unwrap();
    let e = err_of(a.verify_unchanged());
    assert!(
        e.contains("part2.txt") && e.contains("bytes, indexed"),
        "{e}"
    );
    std::fs::write(&files[1], &original).unwrap();
    a.verify_unchanged().unwrap();

    // Bytes from the network are checked against the spec.
    let s = &a.shards[0];
    let mut bytes = a.read_shard(0).unwrap();
    bytes.pop();
    assert!(err_of(verify_shard_bytes(s, &bytes)).contains("bytes, expected"));
    bytes.push(b'?');
    assert!(err_of(verify_shard_bytes(s, &bytes)).contains("checksum mismatch"));

    // A corrupt index file is refused with a reason.
    let mut bad = a.clone();
    bad.shards[1].id = 7;
    bad.save(&path).unwrap();
    let e = err_of(ShardIndex::load(&path));
    assert!(e.contains("shards[1] has id 7"), "{e}");
    assert!(err_of(a.read_shard(10_000)).contains("no such shard"));
}

#[test]
fn epoch_plans_differ_by_epoch_and_not_by_rerun() {
    let d = tmpdir("plan");
    let files = small_corpus(&d, 200);
    let index = build_index(&files, 200, &CorpusOptions::default()).unwrap();
    assert!(index.shards.len() >= 20, "{}", index.shards.len());
    let p0 = plan_epoch(&index, 42, 0, 4);
    assert_eq!(p0, plan_epoch(&index, 42, 0, 4));
    assert_ne!(p0.order, plan_epoch(&index, 42, 1, 4).order);
    assert_ne!(p0.order, plan_epoch(&index, 43, 0, 4).order);
    let one = plan_epoch(&index, 42, 0, 1);
    // The reading order does not depend on the world size; only its cut into runs does.
    assert_eq!(one.order, p0.order);
    assert_eq!(one.run(0), &one.order[..]);
    let mut ids = one.order.clone();
    assert_ne!(
        ids,
        (0..index.shards.len() as u32).collect::<Vec<_>>(),
        "shuffled"
    );
    ids.sort();
    assert_eq!(ids, (0..index.shards.len() as u32).collect::<Vec<_>>());
}

// ---------------------------------------------------------------- property tests

/// A random corpus: files of either format holding documents of words (ASCII and Hangul),
/// with random line ends, blank-line runs and stray blank lines.
#[derive(Debug, Clone)]
struct Corpus {
    files: Vec<(bool, bool, Vec<Vec<String>>)>, // (jsonl, crlf, documents)
}

fn sentence() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "the",
            "cat",
            "sat",
            "라면을",
            "먹었다",
            "on",
            "mat",
            "ünï",
            "42",
            ".",
        ]),
        1..6,
    )
    .prop_map(|w| w.join(" "))
}

fn corpus() -> impl Strategy<Value = Corpus> {
    let doc = prop::collection::vec(sentence(), 1..5);
    let file = (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(doc, 0..7),
    );
    prop::collection::vec(file, 1..5)
        .prop_map(|files| Corpus { files })
        .prop_filter("NSP needs two documents", |c| {
            c.files.iter().map(|f| f.2.len()).sum::<usize>() >= 2
        })
}

fn write_corpus(dir: &Path, c: &Corpus, blank_runs: &[usize]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (i, (jsonl, crlf, docs)) in c.files.iter().enumerate() {
        let nl = if *crlf { "\r\n" } else { "\n" };
        let mut s = String::new();
        for (j, d) in docs.iter().enumerate() {
            let blanks = blank_runs[(i * 7 + j) % blank_runs.len()];
            if *jsonl {
                s.push_str(&serde_json::json!({ "text": d.join("\n") }).to_string());
                s.push_str(nl);
                s.push_str(&nl.repeat(blanks.saturating_sub(1)));
            } else {
                for sent in d {
                    s.push_str(sent);
                    s.push_str(nl);
                }
                s.push_str(&nl.repeat(blanks.max(1)));
            }
        }
        let name = format!("f{i:02}.{}", if *jsonl { "jsonl" } else { "txt" });
        out.push(write(dir, &name, s));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn shards_partition_the_documents(
        c in corpus(),
        target in 1u64..400,
        blank_runs in prop::collection::vec(1usize..4, 1..5),
    ) {
        let d = tmpdir("prop");
        let files = write_corpus(&d, &c, &blank_runs);
        let opts = CorpusOptions::default();
        let index = build_index(&files, target, &opts).unwrap();
        let want: Vec<Document> = c.files.iter().flat_map(|f| f.2.clone()).collect();
        // Every document exactly once, whole, in corpus order; every shard ≥ 2 documents.
        prop_assert_eq!(docs_via_shards(&index), want.clone());
        let streamed: Vec<Document> = DocumentReader::new(resolve_inputs(&files).unwrap(), opts.clone())
            .map(|d| d.unwrap())
            .collect();
        prop_assert_eq!(streamed, want);
        // The shards' ranges tile every byte of every file, in order.
        let mut next = vec![0u64; index.files.len()];
        let mut last_file = 0;
        for s in &index.shards {
            for r in &s.ranges {
                prop_assert!(r.file >= last_file);
                prop_assert_eq!(r.start, next[r.file as usize]);
                prop_assert!(r.end > r.start);
                next[r.file as usize] = r.end;
                last_file = r.file;
            }
        }
        for (f, n) in index.files.iter().zip(&next) {
            prop_assert_eq!(f.size, *n);
        }
        prop_assert_eq!(&build_index(&files, target, &opts).unwrap(), &index);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn epoch_plan_covers_every_shard_once_and_balances(
        sizes in prop::collection::vec(1u64..10_000, 1..60),
        world in 1usize..9,
        seed in any::<u64>(),
        epoch in 0u64..1000,
    ) {
        let index = fake_index(&sizes);
        let plan = plan_epoch(&index, seed, epoch, world);
        prop_assert_eq!(plan.per_rank.len(), world);
        // The runs are consecutive pieces of the order, which holds every shard once.
        prop_assert_eq!(plan.per_rank[0].start, 0);
        prop_assert_eq!(plan.per_rank[world - 1].end, sizes.len());
        for w in plan.per_rank.windows(2) {
            prop_assert_eq!(w[0].end, w[1].start);
        }
        let mut seen = plan.order.clone();
        seen.sort();
        prop_assert_eq!(seen, (0..sizes.len() as u32).collect::<Vec<_>>());
        prop_assert_eq!(&plan.order, &plan_epoch(&index, seed, epoch, 1).order);
        // Each run's bytes are within one (largest) shard of the mean.
        let loads: Vec<u64> = (0..world).map(|r| plan.run(r).iter().map(|&i| sizes[i as usize]).sum()).collect();
        prop_assert_eq!(&loads, &plan.rank_bytes);
        let (total, big) = (sizes.iter().sum::<u64>() as f64, *sizes.iter().max().unwrap() as f64);
        for l in &loads {
            prop_assert!((*l as f64 - total / world as f64).abs() <= big, "loads {:?}", loads);
        }
        prop_assert_eq!(&plan, &plan_epoch(&index, seed, epoch, world));
    }
}

/// An index with shards of the given byte sizes (no files behind it: plans only need sizes).
fn fake_index(sizes: &[u64]) -> ShardIndex {
    let json = serde_json::json!({
        "version": 1,
        "target_shard_bytes": 1,
        "options": CorpusOptions::default(),
        "files": [],
        "shards": sizes.iter().enumerate().map(|(i, b)| serde_json::json!({
            "id": i, "ranges": [], "documents": 2, "bytes": b, "sha256": "0".repeat(64)
        })).collect::<Vec<_>>(),
        "stats": {"documents": 0, "sentences": 0, "skipped_lines": 0, "skipped_records": 0},
    });
    serde_json::from_value(json).unwrap()
}

/// The same corpus and settings give the same vocabulary, run after run (HF's own trainer
/// does not: it breaks ties in hash-map order), and Korean text is covered.
#[test]
fn tokenizer_training_is_deterministic() {
    let corpus = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/data/corpus");
    let train = || {
        tandem::data::tokenizer::train_wordpiece(std::slice::from_ref(&corpus), 3000, true, None, 2)
            .unwrap()
    };
    let (a, b) = (train(), train());
    assert_eq!(a.vocab_size(), b.vocab_size());
    for id in 0..a.vocab_size() as u32 {
        assert_eq!(a.id_to_token(id), b.id_to_token(id), "token {id}");
    }
    let (ids, tokens) = a.encode_with_specials("나는 오늘 라면을 먹었다.").unwrap();
    assert!(!ids.contains(&a.unk_id()), "{tokens:?}");
    assert_eq!((ids[0], ids[ids.len() - 1]), (a.cls_id(), a.sep_id()));
}
