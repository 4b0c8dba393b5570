//! Every fine-tuning stage kind end to end with 2 workers: a short pre-training stage, then
//! the task on a small learnable toy data set; the dev metric must clearly beat the baseline.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Runs `dir/job.toml` with `tandem launch`, asserts success; returns the log.
fn launch_ok(dir: &Path) -> String {
    let mut child = Command::new(bin())
        .arg("launch")
        .arg(dir.join("job.toml"))
        .arg("--no-progress")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("launch.log")).unwrap())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(300));
    let log = std::fs::read_to_string(dir.join("launch.log")).unwrap();
    assert!(status.success(), "{log}");
    log
}

/// Runs `job_dir` + a fine-tuning stage; returns the summary.
fn run_stage(
    name: &str,
    kind: &str,
    train: &str,
    dev: &str,
    files: &[(&str, String)],
    extra: &str,
) -> serde_json::Value {
    let dir = job_dir(name, 2, 2, "", "max_steps = 4\nepochs = 1", 32);
    for (f, text) in files {
        write(&dir.join(f), text);
    }
    let toml = std::fs::read_to_string(dir.join("job.toml")).unwrap()
        + &format!(
            "\n[[stages]]\nname = \"{kind}\"\nkind = \"{kind}\"\ninit_from = \"previous\"\ntrain = \"{}\"\ndev = \"{}\"\nmax_seq_length = 48\nepochs = 12\nbatch_size = 8\nlr = 2e-3\n{extra}\n",
            dir.join(train).display(),
            dir.join(dev).display()
        );
    write(&dir.join("job.toml"), &toml);
    launch_ok(&dir);
    let s = summary(&dir);
    assert_eq!(s["status"], "completed", "{s:#}");
    let st = &s["stages"][1];
    assert_eq!(st["replicas_identical"], true);
    // A fine-tuning stage reports what its kind measures, under its config spelling.
    assert_eq!(st["kind"], kind, "{st:#}");
    let acc = st["train_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{st:#}");
    for pretraining_only in [
        "mlm_accuracy",
        "nsp_accuracy",
        "mlm_loss",
        "documents",
        "masked_fraction",
    ] {
        assert!(
            st.get(pretraining_only).is_none(),
            "{pretraining_only} in {st:#}"
        );
    }
    assert_eq!(s["stages"][0]["kind"], "pretrain");
    // Every training example used once per epoch (the fine-tuning ledger).
    for e in st["epochs_ledger"].as_array().unwrap() {
        assert_eq!(e["instances_consumed"], e["instances_planned"], "{e}");
    }
    // The exported model is an HF directory `tandem predict` can use.
    assert!(dir.join("state/final/config.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
    s
}

const WORDS: [&str; 8] = ["the", "food", "was", "very", "today", "and", "we", "it"];

fn filler(i: usize, n: usize) -> String {
    (0..n)
        .map(|k| WORDS[(i * 7 + k * 3) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn sequence_and_pair_classification_learn_a_separable_task() {
    let mk = |n: usize, off: usize| -> String {
        (0..n)
            .map(|i| {
                let (w, l) = if (i + off) % 2 == 0 {
                    ("good", "pos")
                } else {
                    ("bad", "neg")
                };
                // Examples 2j and 2j+1 share their filler words: only good/bad tells them apart.
                format!(
                    "{{\"text\": \"{} {w} {}\", \"label\": \"{l}\"}}\n",
                    filler(i / 2, 3),
                    filler(i / 2 + 1, 2)
                )
            })
            .collect()
    };
    let s = run_stage(
        "ft-seq",
        "sequence_classification",
        "train.jsonl",
        "dev.jsonl",
        &[("train.jsonl", mk(96, 0)), ("dev.jsonl", mk(40, 1))],
        "",
    );
    let m = &s["stages"][1];
    assert!(
        m["metrics"]["final"]["accuracy"].as_f64().unwrap() > 0.9,
        "{m:#}"
    );
    assert_eq!(m["majority_baseline"], 0.5);

    let mkp = |n: usize, off: usize| -> String {
        (0..n)
            .map(|i| {
                let (w, l) = if (i + off) % 2 == 0 {
                    ("good", "same")
                } else {
                    ("bad", "different")
                };
                format!(
                    "{{\"text_a\": \"{}\", \"text_b\": \"{w} {}\", \"label\": \"{l}\"}}\n",
                    filler(i / 2, 3),
                    filler(i / 2 + 2, 2)
                )
            })
            .collect()
    };
    let s = run_stage(
        "ft-pair",
        "pair_classification",
        "train.jsonl",
        "dev.jsonl",
        &[("train.jsonl", mkp(96, 0)), ("dev.jsonl", mkp(40, 1))],
        "",
    );
    let m = &s["stages"][1];
    assert!(
        m["metrics"]["final"]["accuracy"].as_f64().unwrap() > 0.9,
        "{m:#}"
    );
}

#[test]
fn token_classification_learns_entities() {
    let names = ["alice", "bob", "carol"];
    let places = ["paris", "seoul", "rome"];
    let mk = |n: usize, off: usize| -> String {
        let mut out = String::new();
        for i in 0..n {
            let p = names[(i + off) % 3];
            let l = places[(i + off + 1) % 3];
            let f = filler(i, 2);
            for (w, t) in f.split(' ').map(|w| (w, "O")).chain([
                (p, "B-PER"),
                ("went", "O"),
                ("to", "O"),
                (l, "B-LOC"),
            ]) {
                out += &format!("{w} {t}\n");
            }
            out += "\n";
        }
        out
    };
    let s = run_stage(
        "ft-tok",
        "token_classification",
        "train.conll",
        "dev.conll",
        &[("train.conll", mk(96, 0)), ("dev.conll", mk(30, 1))],
        "",
    );
    let m = &s["stages"][1];
    assert!(m["metrics"]["final"]["f1"].as_f64().unwrap() > 0.9, "{m:#}");
}

#[test]
fn question_answering_finds_the_answer_span() {
    let colours = ["red", "blue", "green", "white"];
    let mk = |n: usize, off: usize| -> String {
        let mut paras = vec![];
        for i in 0..n {
            let c = colours[(i + off) % 4];
            let context = format!("{} . the car is {c} . {} .", filler(i, 3), filler(i + 3, 3));
            let start = context.find(&format!("is {c}")).unwrap() + 3;
            paras.push(format!(
                "{{\"context\": \"{context}\", \"qas\": [{{\"id\": \"q{i}\", \"question\": \"what colour is the car ?\", \"answers\": [{{\"text\": \"{c}\", \"answer_start\": {start}}}]}}]}}"
            ));
        }
        format!(
            "{{\"version\": \"v1.1\", \"data\": [{{\"title\": \"t\", \"paragraphs\": [{}]}}]}}",
            paras.join(",")
        )
    };
    let s = run_stage(
        "ft-qa",
        "question_answering",
        "train.json",
        "dev.json",
        &[("train.json", mk(96, 0)), ("dev.json", mk(24, 1))],
        "doc_stride = 16\nmax_query_length = 16",
    );
    let m = &s["stages"][1];
    assert!(
        m["metrics"]["final"]["exact_match"].as_f64().unwrap() > 0.8,
        "{m:#}"
    );
}

/// A job whose only stage fine-tunes an HF `BertForPreTraining` directory (transformers'
/// own files plus a WordPiece vocab.txt), then `tandem predict` on the exported model.
#[test]
fn fine_tunes_an_hf_checkpoint_directory_and_predicts() {
    let dir = std::env::temp_dir().join(format!("tandem-ft-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(repo().join("tests/fixtures/bert_tiny").join(f), hf.join(f)).unwrap();
    }
    // 96 tokens, the checkpoint's vocab_size.
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    vocab.extend(WORDS.iter().map(|s| s.to_string()));
    vocab.extend(["good", "bad", "movie", "."].iter().map(|s| s.to_string()));
    vocab.extend(('a'..='z').map(|c| c.to_string()));
    vocab.extend(('a'..='z').map(|c| format!("##{c}")));
    while vocab.len() < 96 {
        vocab.push(format!("[unused{}]", vocab.len()));
    }
    write(&hf.join("vocab.txt"), &(vocab.join("\n") + "\n"));
    let mk = |n: usize, off: usize| -> String {
        (0..n)
            .map(|i| {
                let (w, l) = if (i + off) % 2 == 0 {
                    ("good", "pos")
                } else {
                    ("bad", "neg")
                };
                format!(
                    "{{\"text\": \"{} {w} movie . {}\", \"label\": \"{l}\"}}\n",
                    filler(i / 2, 3),
                    filler(i / 2 + 1, 2)
                )
            })
            .collect()
    };
    write(&dir.join("train.jsonl"), &mk(96, 0));
    write(&dir.join("dev.jsonl"), &mk(40, 1));
    write(
        &dir.join("job.toml"),
        &format!(
            r#"
[job]
name = "ft-hf"
state_dir = "{state}"
[cluster]
min_workers = 2
max_workers = 2
[[stages]]
name = "sentiment"
kind = "sequence_classification"
init_from = "{hf}"
train = "{train}"
dev = "{dev}"
max_seq_length = 32
epochs = 12
batch_size = 8
lr = 2e-3
"#,
            state = dir.join("state").display(),
            hf = hf.display(),
            train = dir.join("train.jsonl").display(),
            dev = dir.join("dev.jsonl").display(),
        ),
    );
    let log = launch_ok(&dir);
    assert!(
        log.contains("stage0-init"),
        "the HF directory is imported as the encoder:\n{log}"
    );
    let s = summary(&dir);
    assert!(
        s["stages"][0]["metrics"]["final"]["accuracy"]
            .as_f64()
            .unwrap()
            > 0.9,
        "{s:#}"
    );

    // The exported model predicts with label names from its config.
    let dev: Vec<String> = mk(40, 1).lines().take(6).map(String::from).collect();
    write(&dir.join("in.jsonl"), &(dev.join("\n") + "\n"));
    let out = Command::new(bin())
        .args(["predict", "--checkpoint"])
        .arg(dir.join("state/final"))
        .arg("--input")
        .arg(dir.join("in.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), dev.len());
    for (p, d) in lines.iter().zip(&dev) {
        let want: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(p["label"], want["label"], "{p} for {d}");
    }
    if std::env::var_os("KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
