//! Real HuggingFace artifacts (tests/fixtures/hf_tokenizers, made by transformers with
//! make_tokenizer_fixtures.py; tests/fixtures/hf_export, made with make_export_fixture.py):
//! tandem's ids, offsets and pair features equal what transformers' `AutoTokenizer` gives;
//! `tandem predict` on checkpoints whose tokenizer.json carries its own padding and truncation
//! equals transformers for every head; pre-training with such a tokenizer masks real tokens;
//! `tandem finetune` starts from a transformers checkpoint and exports a model transformers
//! predicts the same with.

mod common;

use std::path::{Path, PathBuf};

use common::tandem;
use serde_json::Value;
use tandem::data::finetune::ClassificationSet;
use tandem::data::tokenizer::Tokenizer;

fn launch(config: &Path) -> (bool, String, String) {
    tandem(&[
        "launch".as_ref(),
        config.as_os_str(),
        "--no-progress".as_ref(),
    ])
}

fn fixtures() -> PathBuf {
    common::repo().join("tests/fixtures/hf_tokenizers")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Each case's ids (with and without special tokens) and character offsets, text by text.
fn check_case(name: &str, case: &Value, tok: &Tokenizer) {
    for t in case["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let short: String = text.chars().take(40).collect();
        let (with, _) = tok.encode_with_specials(text).unwrap();
        assert_eq!(
            with,
            u32s(&t["input_ids"]),
            "{name}: input_ids of {short:?}"
        );
        assert_eq!(
            tok.encode(text).unwrap(),
            u32s(&t["ids"]),
            "{name}: ids of {short:?}"
        );
        let enc = tok.inner().encode_char_offsets(text, false).unwrap();
        let offsets: Vec<Vec<usize>> = enc.get_offsets().iter().map(|o| vec![o.0, o.1]).collect();
        let want: Vec<Vec<usize>> = serde_json::from_value(t["offsets"].clone()).unwrap();
        assert_eq!(offsets, want, "{name}: offsets of {short:?}");
    }
}

/// Pairs through the fine-tuning featurizer, against transformers' `longest_first`.
fn check_pairs(name: &str, case: &Value, tok: &Tokenizer, dir: &Path) {
    let pairs = case["pairs"].as_array().unwrap();
    let file = dir.join(format!("{name}-pairs.jsonl"));
    let lines: Vec<String> = pairs
        .iter()
        .map(|p| serde_json::json!({"text_a": p["a"], "text_b": p["b"], "label": "x"}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let set = ClassificationSet::read(&file).unwrap();
    let max_len = pairs[0]["max_length"].as_u64().unwrap() as usize;
    let feats = set.featurize(tok, None, max_len).unwrap();
    for (f, p) in feats.iter().zip(pairs) {
        assert_eq!(
            f.input_ids,
            u32s(&p["input_ids"]),
            "{name}: pair {:?}",
            p["a"]
        );
        assert_eq!(
            f.token_type_ids,
            u32s(&p["token_type_ids"]),
            "{name}: types of {:?}",
            p["a"]
        );
    }
}

#[test]
fn tokenizers_match_transformers_on_every_published_layout() {
    let exp = expected();
    let cases = exp["cases"].as_object().unwrap();
    assert!(cases.len() >= 8, "fixture cases: {}", cases.len());
    let tmp = common::TmpDir::new("hf", "pairs");
    for (name, case) in cases {
        let dir = fixtures().join(name);
        let tok = Tokenizer::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_case(name, case, &tok);
        check_pairs(name, case, &tok, &tmp);
        // What the coordinator sends the workers encodes the same.
        let sent = Tokenizer::from_json(&tok.to_json().unwrap()).unwrap();
        check_case(&format!("{name} (as sent to workers)"), case, &sent);
    }
}

#[test]
fn a_tokenizer_json_with_padding_and_truncation_neither_pads_nor_cuts() {
    let tok = Tokenizer::load(&fixtures().join("padded_uncased")).unwrap();
    let long = "word ".repeat(300);
    let per_word = tok.encode("word").unwrap().len();
    assert_eq!(tok.encode(&long).unwrap().len(), 300 * per_word);
    let (ids, _) = tok.encode_with_specials("hello world").unwrap();
    assert!(ids.len() < 10 && !ids.contains(&tok.pad_id()), "{ids:?}");
    assert_eq!(tok.model_max_length(), Some(128));
    // Pre-training's sentences: no [PAD] inside, nothing cut.
    let docs = vec![vec!["hello world".to_string(), long.clone()]];
    let enc = tok.encode_documents(&docs).unwrap();
    assert_eq!(enc[0][1].len(), 300 * per_word);
    assert!(enc.iter().flatten().flatten().all(|&i| i != tok.pad_id()));
}

#[test]
fn special_tokens_missing_from_the_vocabulary_are_refused_naming_the_key() {
    let tmp = common::TmpDir::new("hf", "specials");
    let src = fixtures().join("padded_uncased");
    for f in ["tokenizer.json", "vocab.txt"] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    let cfg = r#"{"tokenizer_class": "BertTokenizer", "mask_token": "<mask>"}"#;
    std::fs::write(tmp.join("tokenizer_config.json"), cfg).unwrap();
    let e = Tokenizer::load(&tmp).unwrap_err().to_string();
    assert!(
        e.contains("<mask>") && e.contains("mask_token") && e.contains("tokenizer_config.json"),
        "{e}"
    );
    std::fs::remove_file(tmp.join("tokenizer.json")).unwrap();
    let e = Tokenizer::load(&tmp).unwrap_err().to_string();
    assert!(e.contains("<mask>") && e.contains("mask_token"), "{e}");
}

/// `tandem predict`; one JSON value per output line.
fn predict(dir: &Path, input: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "predict".as_ref(),
        "--checkpoint".as_ref(),
        dir.as_os_str(),
        "--input".as_ref(),
        input.as_os_str(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let (ok, stdout, stderr) = tandem(&args);
    assert!(ok, "{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f64_at(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// tandem's class probabilities against transformers' (`want`, in label order).
fn assert_probabilities(got: &[Value], want: &Value, labels: &Value) {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        for (i, l) in labels.as_array().unwrap().iter().enumerate() {
            let d = (f64_at(&g["probabilities"][l.as_str().unwrap()]) - f64_at(&w[i])).abs();
            worst = worst.max(d);
        }
    }
    assert!(
        worst < 1e-4,
        "largest probability difference from transformers: {worst}"
    );
}

#[test]
fn predict_on_a_checkpoint_with_a_padded_tokenizer_matches_transformers() {
    let dir = fixtures().join("seqcls_padded");
    let exp = read_json(&dir.join("expected_predictions.json"));
    let got = predict(
        &dir,
        &dir.join("inputs.jsonl"),
        &["--max-seq-length", "128"],
    );
    assert_probabilities(&got, &exp["probabilities"], &exp["labels"]);
    // Sentence pairs, truncated longest-first to 128 as transformers does.
    let exp = read_json(&dir.join("expected_pair_predictions.json"));
    let got = predict(
        &dir,
        &dir.join("inputs_pairs.jsonl"),
        &["--max-seq-length", "128"],
    );
    assert_probabilities(&got, &exp["probabilities"], &exp["labels"]);
}

/// Token classification: every word's label (first sub-token's argmax, words as the
/// tokenizer's word_ids group them) and the entities seqeval decodes from them, with their
/// character spans and mean scores, equal transformers'; words past 64 tokens get none.
#[test]
fn token_classification_on_a_padded_tokenizer_matches_transformers() {
    let dir = fixtures().join("tokcls_padded");
    let exp = read_json(&dir.join("expected_predictions.json"));
    let got = predict(&dir, &dir.join("inputs.jsonl"), &["--max-seq-length", "64"]);
    let want = exp["predictions"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g["tokens"], w["tokens"], "text {i}");
        let (ge, we) = (
            g["entities"].as_array().unwrap(),
            w["entities"].as_array().unwrap(),
        );
        assert_eq!(ge.len(), we.len(), "text {i}: {ge:?} vs {we:?}");
        for (a, b) in ge.iter().zip(we) {
            for k in ["type", "text", "start", "end"] {
                assert_eq!(a[k], b[k], "text {i}: {a} vs {b}");
            }
            assert!(
                (f64_at(&a["score"]) - f64_at(&b["score"])).abs() < 1e-4,
                "{a} vs {b}"
            );
        }
    }
    let cut = got.iter().flat_map(|g| g["tokens"].as_array().unwrap());
    assert!(cut.filter(|t| t["label"].is_null()).count() > 100);
}

/// QA over windows of 64 tokens with 16 shared: the same windows as transformers'
/// overflowing tokens, the same best span (character offsets) and score.
#[test]
fn question_answering_on_a_padded_tokenizer_matches_transformers() {
    let dir = fixtures().join("qa_padded");
    let exp = read_json(&dir.join("expected_predictions.json"));
    let got = predict(
        &dir,
        &dir.join("inputs.jsonl"),
        &["--max-seq-length", "64", "--doc-stride", "16"],
    );
    let want = exp["predictions"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        for k in ["id", "answer", "start", "end"] {
            assert_eq!(g[k], w[k], "{g} vs {w}");
        }
        assert!(
            (f64_at(&g["score"]) - f64_at(&w["score"])).abs() < 1e-4,
            "{g} vs {w}"
        );
    }
}

/// A job of one fine-tuning stage from a transformers-made checkpoint (whose tokenizer.json
/// pads and truncates to 128): no [data] or [model] section, no corpus scan, 2 workers; the
/// exported model predicts with `tandem predict`.
#[test]
fn a_fine_tuning_only_job_starts_from_a_transformers_checkpoint() {
    let dir = common::TmpDir::new("hf", "finetune-only");
    let labels = ["negative", "neutral", "positive"];
    let words = ["good", "bad", "fine", "great", "awful", "okay"];
    let lines = |n: usize| {
        (0..n)
            .map(|i| {
                let text = format!("the food was {} today", words[i % words.len()]);
                serde_json::json!({"text": text, "label": labels[i % 3]}).to_string() + "\n"
            })
            .collect::<String>()
    };
    std::fs::write(dir.join("train.jsonl"), lines(48)).unwrap();
    std::fs::write(dir.join("dev.jsonl"), lines(12)).unwrap();
    let init = fixtures().join("seqcls_padded");
    let toml = format!(
        "[job]\nname = \"ft\"\nstate_dir = \"{state}\"\n[cluster]\nmin_workers = 2\nmax_workers = 2\n\
         [[stages]]\nname = \"cls\"\nkind = \"sequence_classification\"\ninit_from = \"{init}\"\n\
         train = \"{train}\"\ndev = \"{dev}\"\nepochs = 2\nbatch_size = 4\nmax_seq_length = 32\nlr = 1e-3\n",
        state = dir.join("state").display(),
        init = init.display(),
        train = dir.join("train.jsonl").display(),
        dev = dir.join("dev.jsonl").display(),
    );
    std::fs::write(dir.join("job.toml"), toml).unwrap();
    let (ok, _, log) = launch(&dir.join("job.toml"));
    assert!(ok, "{log}");
    let s = common::summary(&dir);
    assert_eq!(s["status"], "completed", "{s:#}");
    assert_eq!(s["corpus_documents"], 0, "{s:#}");
    assert!(!dir.join("state/shards.json").exists());
    let st = &s["stages"][0];
    assert_eq!(st["kind"], "sequence_classification");
    assert_eq!(st["world_size"], 2);
    assert_eq!(st["replicas_identical"], true);
    assert!(st["train_accuracy"].is_number(), "{st:#}");
    // The exported tokenizer encodes as the checkpoint's did, without its padding.
    let exported = Tokenizer::load(&dir.join("state/final")).unwrap();
    let original = Tokenizer::load(&init).unwrap();
    let text = "the food was good today";
    assert_eq!(
        exported.encode(text).unwrap(),
        original.encode(text).unwrap()
    );
    assert_eq!(exported.encode(text).unwrap().len(), 5);
    let (state, dev) = (dir.join("state"), dir.join("dev.jsonl"));
    let (ok, stdout, stderr) = tandem(&[
        "predict".as_ref(),
        "--checkpoint".as_ref(),
        state.as_os_str(),
        "--input".as_ref(),
        dev.as_os_str(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 12);
    // A [model] section that disagrees with the checkpoint is refused, naming both; so is a
    // data.tokenizer other than the checkpoint's own (the stage would not use it).
    let job = std::fs::read_to_string(dir.join("job.toml")).unwrap();
    let refused = |name: &str, extra: String| {
        let path = dir.join(format!("{name}.toml"));
        let text = job.replace("/state\"", &format!("/{name}\"")) + &extra;
        std::fs::write(&path, text).unwrap();
        let (ok, _, log) = launch(&path);
        assert!(!ok, "{name}: {log}");
        log
    };
    let log = refused("preset", "[model]\npreset = \"base\"\n".into());
    assert!(
        log.contains("model.preset") && log.contains("init_from"),
        "{log}"
    );
    let cased = fixtures().join("cased");
    let log = refused(
        "tok",
        format!("[data]\ntokenizer = \"{}\"\n", cased.display()),
    );
    assert!(
        log.contains("data.tokenizer") && log.contains("differs"),
        "{log}"
    );
}

/// `tandem finetune` of the transformers-made `seqcls_padded` on the hf_export fixture's
/// data into `state`, with `extra` flags.
fn finetune(state: &Path, extra: &[&str]) -> (bool, String, String) {
    let fx = common::repo().join("tests/fixtures/hf_export");
    let init = fixtures().join("seqcls_padded");
    let (train, dev) = (fx.join("train.jsonl"), fx.join("dev.jsonl"));
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "finetune".as_ref(),
        "--checkpoint".as_ref(),
        init.as_os_str(),
        "--train".as_ref(),
        train.as_os_str(),
        "--dev".as_ref(),
        dev.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    tandem(&args)
}

/// `tandem finetune` on the transformers-made checkpoint with 2 workers; transformers loads
/// the exported model and tokenizer (tests/fixtures/hf_export/make_export_fixture.py, same
/// command) and its probabilities equal tandem's on the rerun job's export.
#[test]
fn tandem_finetune_exports_what_transformers_predicts_the_same_with() {
    let fx = common::repo().join("tests/fixtures/hf_export");
    let exp = read_json(&fx.join("expected.json"));
    let dir = common::TmpDir::new("hf", "finetune-cmd");
    let state = dir.join("state");
    let init = fixtures().join("seqcls_padded");
    let dev = fx.join("dev.jsonl");
    let extra: Vec<&str> = (exp["args"].as_array().unwrap().iter())
        .map(|a| a.as_str().unwrap())
        .collect();
    let (ok, _, log) = finetune(&state, &extra);
    assert!(ok, "{log}");
    let s = common::summary(&dir);
    assert_eq!(s["status"], "completed", "{s:#}");
    let st = &s["stages"][0];
    assert_eq!(st["kind"], "sequence_classification");
    assert_eq!(st["world_size"], 2);
    assert_eq!(st["replicas_identical"], true);
    // The job is a plain config file in the state dir, which `launch` would run again.
    let written = state.join("finetune.toml");
    let (ok, _, log) = tandem(&["config".as_ref(), "check".as_ref(), written.as_os_str()]);
    assert!(ok, "{log}");
    let seq = ["--max-seq-length", "32"];
    let got = predict(&state, &dev, &seq);
    assert_probabilities(&got, &exp["transformers_probabilities"], &exp["labels"]);
    // It trained: the checkpoint it started from predicts otherwise.
    let before = predict(&init, &dev, &seq);
    let moved = (got.iter().zip(&before))
        .flat_map(|(a, b)| {
            let (a, b) = (&a["probabilities"], &b["probabilities"]);
            (exp["labels"].as_array().unwrap().iter())
                .map(|l| (f64_at(&a[l.as_str().unwrap()]) - f64_at(&b[l.as_str().unwrap()])).abs())
                .collect::<Vec<_>>()
        })
        .fold(0f64, f64::max);
    assert!(
        moved > 0.1,
        "fine-tuning moved no probability by more than {moved}"
    );
    // A second run into the same state dir refuses and says how to resume.
    let (ok, _, log) = finetune(&state, &extra);
    assert!(!ok && log.contains("tandem launch --resume"), "{log}");
}

/// A fine-tuning stage cut by --max-steps mid-epoch: its ledger counts the examples it
/// trained (3 steps × 2 workers × 4), and it still evaluates dev and exports.
#[test]
fn a_fine_tuning_stage_cut_by_max_steps_accounts_for_what_it_trained() {
    let dir = common::TmpDir::new("hf", "finetune-cut");
    let state = dir.join("state");
    let (ok, _, log) = finetune(
        &state,
        &[
            "--task",
            "sequence_classification",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--no-progress",
        ],
    );
    assert!(ok, "{log}");
    let s = common::summary(&dir);
    let st = &s["stages"][0];
    assert_eq!(st["steps"], 3, "{st:#}");
    assert_eq!(st["examples"], 24, "{st:#}");
    let ledger = st["epochs_ledger"].as_array().unwrap();
    assert_eq!(ledger.len(), 1, "{st:#}");
    assert_eq!(ledger[0]["instances_planned"], 60, "{st:#}");
    assert_eq!(ledger[0]["instances_consumed"], 24, "{st:#}");
    assert_eq!(ledger[0]["instances_repeated"], 0, "{st:#}");
    // It ran in one of its 3 planned epochs, from the imported checkpoint.
    assert_eq!(
        (st["epochs"].as_u64(), st["epochs_planned"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(s["history"][0]["start_checkpoint"], "stage0-init", "{s:#}");
    assert_eq!(st["metrics"]["final"]["examples"], 15.0, "{st:#}");
    assert!(st["metrics"]["best"]["score"].is_number(), "{st:#}");
    assert!(state.join("final/model.safetensors").exists());
}

/// Sequences longer than the checkpoint's positions are refused before any worker starts;
/// longer than its tokenizer's model_max_length (128 here, positions 256) only warned about.
#[test]
fn a_max_seq_length_beyond_the_checkpoint_is_refused_or_warned_about() {
    let dir = common::TmpDir::new("hf", "finetune-len");
    let run = |len: &str| {
        let flags = [
            "--task",
            "sequence_classification",
            "--max-steps",
            "1",
            "--no-progress",
        ];
        let mut extra = vec!["--max-seq-length", len];
        extra.extend(flags);
        finetune(&dir.join(format!("state{len}")), &extra)
    };
    let (ok, _, log) = run("512");
    assert!(!ok, "{log}");
    assert!(
        log.contains("stages[0].max_seq_length 512 exceeds the max_position_embeddings 256"),
        "{log}"
    );
    let (ok, _, log) = run("200");
    assert!(ok, "{log}");
    assert!(
        log.contains("stages[0].max_seq_length 200 exceeds the tokenizer's model_max_length 128"),
        "{log}"
    );
    let (ok, _, log) = run("128");
    assert!(ok && !log.contains("model_max_length"), "{log}");
    // A later stage with init_from = "previous" starts from that checkpoint: its positions.
    let fx = |f: &str| common::repo().join("tests/fixtures/hf_export").join(f);
    let job = dir.join("state128/finetune.toml");
    let two = std::fs::read_to_string(&job)
        .unwrap()
        .replace("state128", "two")
        + "\n[[stages]]\nname = \"again\"\nkind = \"sequence_classification\"\n\
           init_from = \"previous\"\nlr = 1e-3\nmax_seq_length = 300\n"
        + &format!(
            "train = {:?}\ndev = {:?}\n",
            fx("train.jsonl"),
            fx("dev.jsonl")
        );
    std::fs::write(dir.join("two.toml"), two).unwrap();
    let (ok, _, log) = tandem(&["launch".as_ref(), dir.join("two.toml").as_os_str()]);
    assert!(
        !ok && log.contains("stages[1].max_seq_length 300 exceeds the max_position_embeddings 256 of stages[0].init_from"),
        "{log}"
    );
}

/// Pre-training with the padded tokenizer as data.tokenizer: the instances are made from the
/// real tokens (about 15% masked, no [PAD] inside segments), not from sentences padded to 128.
#[test]
fn pre_training_with_a_padded_tokenizer_masks_real_tokens() {
    let dir = common::job_dir("hf-pretrain-padded", 2, 2, "", "max_steps = 6", 32);
    let tok = fixtures().join("padded_uncased");
    let (ok, _, log) = tandem(&[
        "launch".as_ref(),
        dir.join("job.toml").as_os_str(),
        "--no-progress".as_ref(),
        "--set".as_ref(),
        format!("data.tokenizer={}", tok.display()).as_ref(),
    ]);
    assert!(ok, "{log}");
    let s = common::summary(&dir);
    let st = &s["stages"][0];
    let masked = f64_at(&st["masked_fraction"]);
    assert!(
        (0.10..0.20).contains(&masked),
        "masked fraction {masked}: {st:#}"
    );
    let vocab = std::fs::read_to_string(tok.join("vocab.txt")).unwrap();
    let cfg = read_json(&dir.join("state/final/config.json"));
    assert_eq!(cfg["vocab_size"], vocab.lines().count(), "{cfg:#}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Without --max-seq-length, `predict` truncates where transformers would: at the
/// tokenizer's model_max_length (here raised to 256, within the model's 256 positions).
#[test]
fn predict_truncates_at_the_tokenizers_model_max_length_by_default() {
    let dir = common::TmpDir::new("hf", "max-length");
    let src = fixtures().join("seqcls_padded");
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["model_max_length"] = 256.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let input = dir.join("inputs.jsonl");
    let default = predict(&dir, &input, &[]);
    assert_eq!(default, predict(&dir, &input, &["--max-seq-length", "256"]));
    let cut = predict(&dir, &input, &["--max-seq-length", "128"]);
    // The long text (over 256 tokens) reads further at 256 than at 128.
    assert_ne!(default.last(), cut.last());
    assert_eq!(default[..default.len() - 1], cut[..cut.len() - 1]);
}
