//! Fine-tuning heads: parity with transformers' task classes (fixtures from
//! tests/fixtures/make_head_fixtures.py), the round trip tandem → transformers, starting a task
//! from a pre-training checkpoint, and gradients against finite differences.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, Normal};
use serde_json::{json, Value};
use tandem::data::batch::{FinetuneBatch, PretrainBatch, TaskLabels, IGNORE};
use tandem::model::hf;
use tandem::model::params::Init;
use tandem::model::{task_specs, BertConfig, PretrainModel, TaskHead, TaskModel};

const SEQ: TaskHead = TaskHead::SequenceClassification { num_labels: 3 };
const TOK: TaskHead = TaskHead::TokenClassification { num_labels: 5 };
const QA: TaskHead = TaskHead::QuestionAnswering;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-heads-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        _ => panic!("not numeric: {v}"),
    }
}

fn rows(v: &Value) -> Vec<i64> {
    flat(v).into_iter().map(|x| x as i64).collect()
}

fn to64(t: &Tensor) -> Vec<f64> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.into_iter().map(f64::from).collect()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

/// Max |a - b| relative to the largest |b|.
fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    let d = got.iter().zip(want).map(|(g, w)| (g - w).abs());
    d.fold(0f64, f64::max) / scale
}

/// A batch in HF field names (`labels`, or `start_positions` / `end_positions`).
fn batch_from_json(v: &Value) -> FinetuneBatch {
    let ids = &v["input_ids"];
    let (batch, seq) = (
        ids.as_array().unwrap().len(),
        ids[0].as_array().unwrap().len(),
    );
    let u32s = |v: &Value| rows(v).into_iter().map(|x| x as u32).collect::<Vec<_>>();
    let labels = if let Some(s) = v.get("start_positions") {
        TaskLabels::Spans {
            start: u32s(s),
            end: u32s(&v["end_positions"]),
        }
    } else if v["labels"][0].is_array() {
        TaskLabels::Tokens(rows(&v["labels"]))
    } else {
        TaskLabels::Classes(u32s(&v["labels"]))
    };
    FinetuneBatch {
        batch,
        seq,
        input_ids: u32s(ids),
        token_type_ids: u32s(&v["token_type_ids"]),
        attention_mask: u32s(&v["attention_mask"]),
        labels,
    }
}

fn batch_to_json(b: &FinetuneBatch) -> Value {
    let grid = |v: Vec<i64>| -> Vec<Vec<i64>> { v.chunks(b.seq).map(|r| r.to_vec()).collect() };
    let i64s = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
    let mut j = json!({
        "input_ids": grid(i64s(&b.input_ids)),
        "token_type_ids": grid(i64s(&b.token_type_ids)),
        "attention_mask": grid(i64s(&b.attention_mask)),
    });
    match &b.labels {
        TaskLabels::None => {}
        TaskLabels::Classes(l) => j["labels"] = json!(l),
        TaskLabels::Tokens(l) => j["labels"] = json!(grid(l.clone())),
        TaskLabels::Spans { start, end } => {
            j["start_positions"] = json!(start);
            j["end_positions"] = json!(end);
        }
    }
    j
}

/// loss_sum / count after one backward pass; gradients per parameter name.
fn loss_and_grads(m: &TaskModel, b: &FinetuneBatch) -> (f64, Vec<f32>) {
    let out = m.forward(b, &mut None).unwrap();
    let loss = (out.loss_sum / out.count as f64).unwrap();
    let grads = loss.backward().unwrap();
    let mut flat = vec![0f32; m.store.numel()];
    m.store.accumulate_grads(&grads, &mut flat).unwrap();
    (scalar(&loss), flat)
}

// ------------------------------------------------------------- transformers → tandem

fn check_hf_fixture(dir: &str, head: TaskHead) {
    let (m, report) = TaskModel::load(&fixture(dir), 0, &Device::Cpu).unwrap();
    assert_eq!(m.head, head);
    assert!(report.initialised.is_empty(), "{:?}", report.initialised);
    let e = read_json(&fixture(dir).join("expected.json"));
    assert_eq!(e["architecture"], head.architecture());
    let b = batch_from_json(&e["batch"]);

    let logits = m.logits(&b).unwrap();
    let d = max_rel(&to64(&logits), &flat(&e["logits"]));
    println!("{dir}: max relative logit difference {d:.2e}");
    assert!(d <= 1e-4, "{dir}: logits differ by {d} (relative)");

    let (loss, grad) = loss_and_grads(&m, &b);
    let want = e["loss"].as_f64().unwrap();
    println!("{dir}: loss tandem {loss}, transformers {want}");
    assert!(
        (loss - want).abs() <= 1e-4 * want.abs(),
        "{dir}: loss {loss} vs {want}"
    );

    // Same parameter set as transformers' named_parameters(), and the same gradients.
    let want = e["grad_norms"].as_object().unwrap();
    let names: Vec<&str> = m.store.specs().iter().map(|s| s.name.as_str()).collect();
    let mut hf_names: Vec<&str> = want.keys().map(|k| k.as_str()).collect();
    hf_names.sort();
    assert_eq!(
        names, hf_names,
        "{dir}: task_specs against named_parameters()"
    );
    let total = want
        .values()
        .map(|v| v.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt();
    let mut worst = 0f64;
    for (i, spec) in m.store.specs().iter().enumerate() {
        // Includes the padding row of the word embeddings: like nn.Embedding(padding_idx),
        // tandem's lookup gives it no gradient, which QA's softmax over every position tests.
        let g = grad[m.store.range(i)]
            .to_vec()
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let w = want[&spec.name].as_f64().unwrap();
        // The key bias's gradient is zero in exact arithmetic (rounding noise on both sides).
        // So is QA's output bias (the softmax runs over positions).
        let tiny = w < 1e-6 * total && g < 1e-6 * total;
        let ok = (g - w).abs() <= 1e-3 * w || tiny;
        assert!(
            ok,
            "{dir}: grad norm of {}: tandem {g}, transformers {w}",
            spec.name
        );
        if !tiny {
            worst = worst.max((g - w).abs() / w);
        }
    }
    println!("{dir}: max relative gradient-norm difference {worst:.2e}");
}

#[test]
fn sequence_classification_matches_transformers() {
    check_hf_fixture("seqcls_tiny", SEQ);
    let (m, _) = TaskModel::load(&fixture("seqcls_tiny"), 0, &Device::Cpu).unwrap();
    assert_eq!(m.labels(), ["negative", "neutral", "positive"]);
}

#[test]
fn token_classification_matches_transformers() {
    check_hf_fixture("tokcls_tiny", TOK);
    let (m, _) = TaskModel::load(&fixture("tokcls_tiny"), 0, &Device::Cpu).unwrap();
    assert_eq!(m.labels(), ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]);
}

#[test]
fn question_answering_matches_transformers() {
    check_hf_fixture("qa_tiny", QA);
}

#[test]
fn counts_follow_the_labels() {
    let (m, _) = TaskModel::load(&fixture("tokcls_tiny"), 0, &Device::Cpu).unwrap();
    let e = read_json(&fixture("tokcls_tiny/expected.json"));
    let mut b = batch_from_json(&e["batch"]);
    let TaskLabels::Tokens(l) = &b.labels else {
        panic!("token labels")
    };
    let labelled = l.iter().filter(|v| **v != IGNORE).count();
    let out = m.forward(&b, &mut None).unwrap();
    assert_eq!(out.count, labelled);
    assert_eq!(out.logits.dims(), [3, 12, 5]);
    // No labelled position: a zero loss that still gives every parameter a gradient.
    b.labels = TaskLabels::Tokens(vec![IGNORE; 36]);
    let (loss, grad) = {
        let out = m.forward(&b, &mut None).unwrap();
        assert_eq!(out.count, 0);
        let grads = out.loss_sum.backward().unwrap();
        let mut flat = vec![0f32; m.store.numel()];
        m.store.accumulate_grads(&grads, &mut flat).unwrap();
        (scalar(&out.loss_sum), flat)
    };
    assert_eq!(loss, 0.0);
    assert!(grad.iter().all(|g| *g == 0.0));
    b.labels = TaskLabels::None;
    assert_eq!(m.forward(&b, &mut None).unwrap().count, 0);
}

#[test]
fn bad_labels_and_checkpoints_are_named() {
    let (m, _) = TaskModel::load(&fixture("seqcls_tiny"), 0, &Device::Cpu).unwrap();
    let e = read_json(&fixture("seqcls_tiny/expected.json"));
    let mut b = batch_from_json(&e["batch"]);
    b.labels = TaskLabels::Classes(vec![0, 3, 1]);
    let err = m.forward(&b, &mut None).err().unwrap().to_string();
    assert!(err.contains("labels[1] = 3"), "{err}");
    b.labels = TaskLabels::Tokens(vec![0; 36]);
    let err = m.forward(&b, &mut None).err().unwrap().to_string();
    assert!(
        err.contains("BertForSequenceClassification cannot train on labels Tokens"),
        "{err}"
    );

    let (qa, _) = TaskModel::load(&fixture("qa_tiny"), 0, &Device::Cpu).unwrap();
    b.labels = TaskLabels::Spans {
        start: vec![0, 12, 1],
        end: vec![0, 0, 1],
    };
    let err = qa.forward(&b, &mut None).err().unwrap().to_string();
    assert!(err.contains("start_positions[1] = 12"), "{err}");

    // A checkpoint whose config disagrees with its classifier (4 labels, weights for 3).
    let dir = tmp("badshape");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture("seqcls_tiny/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg = read_json(&fixture("seqcls_tiny/config.json"));
    cfg["id2label"] = json!({"0": "a", "1": "b", "2": "c", "3": "d"});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = TaskModel::load(&dir, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("classifier.bias") && err.contains("expected shape [4]"),
        "{err}"
    );

    // A QA checkpoint with a classifier in it, and a pre-training checkpoint.
    let mut t = hf::read_tensors(&fixture("qa_tiny")).unwrap();
    t.insert(
        "classifier.weight".into(),
        Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::copy(fixture("qa_tiny/config.json"), dir.join("config.json")).unwrap();
    let err = TaskModel::load(&dir, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("classifier.weight") && err.contains("not a parameter"),
        "{err}"
    );
    let err = TaskModel::load(&fixture("bert_tiny"), 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("BertForPreTraining") && err.contains("from_pretrained_encoder"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

// ------------------------------------------------------------- tandem → transformers

fn roundtrip_cfg() -> BertConfig {
    let mut c = BertConfig::new(40, 16, 2, 2, 32);
    c.max_position_embeddings = 16;
    c.initializer_range = 0.2;
    c
}

/// A tandem-made model with every bias and LayerNorm weight perturbed (so all of them matter).
fn roundtrip_model(head: TaskHead, seed: u64) -> TaskModel {
    let m = TaskModel::new(&roundtrip_cfg(), head, seed, &Device::Cpu).unwrap();
    let mut rng = tandem::util::rng(&[seed, 99]);
    let noise = Normal::new(0.0f32, 0.1).unwrap();
    for s in m.store.specs() {
        let base = match s.init {
            Init::Zeros => 0.0,
            Init::Ones => 1.0,
            _ => continue,
        };
        let v: Vec<f32> = (0..s.numel())
            .map(|_| base + noise.sample(&mut rng))
            .collect();
        m.store
            .set(
                &s.name,
                &Tensor::from_vec(v, s.shape.as_slice(), &Device::Cpu).unwrap(),
            )
            .unwrap();
    }
    m
}

fn roundtrip_batch(head: TaskHead) -> FinetuneBatch {
    let (batch, seq) = (2, 10);
    let input_ids = vec![
        2, 7, 8, 9, 3, 11, 12, 13, 14, 3, 2, 21, 22, 3, 31, 32, 3, 0, 0, 0,
    ];
    let token_type_ids = vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0];
    let attention_mask = [vec![1; 17], vec![0; 3]].concat();
    let labels = match head {
        TaskHead::SequenceClassification { .. } => TaskLabels::Classes(vec![1, 2]),
        TaskHead::TokenClassification { .. } => {
            let x = IGNORE;
            TaskLabels::Tokens(vec![
                x, 0, 1, 2, x, 3, 0, x, 1, x, x, 2, 3, x, 0, 1, x, x, x, x,
            ])
        }
        TaskHead::QuestionAnswering => TaskLabels::Spans {
            start: vec![5, 0],
            end: vec![7, 0],
        },
    };
    FinetuneBatch {
        batch,
        seq,
        input_ids,
        token_type_ids,
        attention_mask,
        labels,
    }
}

const ROUNDTRIP: [(&str, TaskHead, &[&str]); 3] = [
    (
        "seqcls",
        TaskHead::SequenceClassification { num_labels: 3 },
        &["neg", "neu", "pos"],
    ),
    (
        "tokcls",
        TaskHead::TokenClassification { num_labels: 4 },
        &["O", "B", "I", "X"],
    ),
    ("qa", TaskHead::QuestionAnswering, &[]),
];

/// With TANDEM_WRITE_FIXTURES=1 writes tests/fixtures/roundtrip/<kind>/ (checkpoint + tandem's
/// outputs) for make_head_fixtures.py; otherwise checks the committed files are what tandem
/// makes now and that transformers reproduced tandem's logits from them.
#[test]
fn roundtrip_tandem_checkpoints_load_in_transformers() {
    let write = std::env::var("TANDEM_WRITE_FIXTURES").is_ok_and(|v| v == "1");
    let root = fixture("roundtrip");
    for (i, (kind, head, labels)) in ROUNDTRIP.into_iter().enumerate() {
        let m = roundtrip_model(head, 100 + i as u64);
        let b = roundtrip_batch(head);
        let out = m.forward(&b, &mut None).unwrap();
        let loss = scalar(&out.loss_sum) / out.count as f64;
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let dir = root.join(kind);
        if write {
            m.save(&dir, &labels).unwrap();
            let j = json!({
                "architecture": head.architecture(),
                "batch": batch_to_json(&b),
                "id2label": labels,
                "loss": loss,
                "logits": to64(&out.logits),
                "logits_shape": out.logits.dims(),
            });
            let text = serde_json::to_string_pretty(&j).unwrap();
            std::fs::write(dir.join("tandem_outputs.json"), text).unwrap();
            continue;
        }
        // The committed checkpoint is this model, saved as tandem saves it now.
        let (back, report) = TaskModel::load(&dir, 0, &Device::Cpu).unwrap();
        assert!(
            report.initialised.is_empty() && report.ignored.is_empty(),
            "{report:?}"
        );
        assert_eq!(back.head, head);
        assert_eq!(back.labels(), labels);
        assert_eq!(
            back.store.fingerprint().unwrap(),
            m.store.fingerprint().unwrap(),
            "{kind}"
        );
        let fresh = tmp(&format!("rt-{kind}"));
        m.save(&fresh, &labels).unwrap();
        assert_eq!(
            read_json(&fresh.join("config.json")),
            read_json(&dir.join("config.json"))
        );
        std::fs::remove_dir_all(fresh).unwrap();
        let t = read_json(&dir.join("tandem_outputs.json"));
        assert_eq!(t["batch"], batch_to_json(&b));
        assert!(
            max_rel(&to64(&out.logits), &flat(&t["logits"])) < 1e-5,
            "{kind}"
        );
    }
    if write {
        return;
    }
    // What make_head_fixtures.py roundtrip found when it loaded those files.
    let check = read_json(&root.join("roundtrip_check.json"));
    assert_eq!(check["passed"], true);
    let results = check["results"].as_object().unwrap();
    assert_eq!(results.len(), 6, "Auto and explicit class for each head");
    for (kind, head, _) in ROUNDTRIP {
        for r in results
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{kind}/")))
            .map(|x| x.1)
        {
            assert_eq!(r["model_class"], head.architecture());
            assert_eq!(r["loading_problems"], json!({}));
            assert!(r["max_abs_logit_diff"].as_f64().unwrap() < 1e-4, "{r}");
            assert_eq!(r["passed"], true);
        }
    }
}

#[test]
fn save_then_load_round_trips_exactly() {
    for (i, head) in [SEQ, TOK, QA].into_iter().enumerate() {
        let m = roundtrip_model(head, 7 + i as u64);
        let dir = tmp(&format!("save-{i}"));
        m.save(&dir, &[]).unwrap();
        let (back, report) = TaskModel::load(&dir, 1, &Device::Cpu).unwrap();
        assert!(report.initialised.is_empty());
        assert_eq!(back.head, head);
        assert_eq!(
            back.store.fingerprint().unwrap(),
            m.store.fingerprint().unwrap()
        );
        let cfg = read_json(&dir.join("config.json"));
        assert_eq!(cfg["architectures"][0], head.architecture());
        if head == QA {
            assert!(cfg.get("id2label").is_none());
            assert!(m.save(&dir, &["x".into()]).is_err());
        } else {
            assert_eq!(cfg["num_labels"], head.num_outputs());
            assert_eq!(cfg["label2id"]["LABEL_1"], 1);
            let err = m.save(&dir, &["only".into()]).err().unwrap().to_string();
            assert!(err.contains("id2label has 1 names"), "{err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

// ------------------------------------------------------------- from a pre-training checkpoint

fn labels_for(head: TaskHead, b: &PretrainBatch) -> TaskLabels {
    let (n, t) = (b.batch, b.seq);
    match head {
        TaskHead::SequenceClassification { num_labels } => {
            TaskLabels::Classes((0..n).map(|i| (i % num_labels) as u32).collect())
        }
        TaskHead::TokenClassification { num_labels } => TaskLabels::Tokens(
            (0..n * t)
                .map(|i| {
                    if b.attention_mask[i] == 0 || i % t == 0 {
                        IGNORE
                    } else {
                        (i % num_labels) as i64
                    }
                })
                .collect(),
        ),
        TaskHead::QuestionAnswering => TaskLabels::Spans {
            start: (0..n as u32).map(|i| i * 2).collect(),
            end: (0..n as u32).map(|i| i * 3).collect(),
        },
    }
}

fn finetune_batch(b: &PretrainBatch, head: TaskHead) -> FinetuneBatch {
    FinetuneBatch {
        batch: b.batch,
        seq: b.seq,
        input_ids: b.input_ids.clone(),
        token_type_ids: b.token_type_ids.clone(),
        attention_mask: b.attention_mask.clone(),
        labels: labels_for(head, b),
    }
}

#[test]
fn from_pretrained_encoder_copies_the_encoder_and_initialises_the_head() {
    let dir = fixture("bert_tiny");
    let (pre, _) = PretrainModel::load(&dir, 0, &Device::Cpu).unwrap();
    let pre_t = pre.store.tensors();
    let ck_names: Vec<String> = hf::read_tensors(&dir).unwrap().into_keys().collect();
    let pb = PretrainBatch::from_json_file(&dir.join("batch.json")).unwrap();
    for head in [SEQ, TOK, QA] {
        let (m, report) = TaskModel::from_pretrained_encoder(&dir, head, 5, &Device::Cpu).unwrap();
        let names: Vec<String> = task_specs(&m.cfg, head)
            .into_iter()
            .map(|s| s.name)
            .collect();
        for name in names.iter().filter(|n| n.starts_with("bert.")) {
            let d = (m.store.get(name).unwrap() - &pre_t[name])
                .unwrap()
                .abs()
                .unwrap();
            assert_eq!(scalar(&d.max_all().unwrap()), 0.0, "{name} copied exactly");
        }
        let l = head.layer_name();
        assert_eq!(
            report.initialised,
            [format!("{l}.bias"), format!("{l}.weight")]
        );
        for n in &ck_names {
            let dropped = n.starts_with("cls.") || (!head.uses_pooler() && n.contains("pooler"));
            assert_eq!(
                report.ignored.contains(n),
                dropped,
                "{n}: {:?}",
                report.ignored
            );
        }
        // The head is BERT-initialised from the seed, as a fresh model's.
        let fresh = TaskModel::new(&m.cfg, head, 5, &Device::Cpu).unwrap();
        let w = m.store.get(&format!("{l}.weight")).unwrap();
        assert_eq!(
            to64(&w),
            to64(&fresh.store.get(&format!("{l}.weight")).unwrap())
        );
        let std = to64(&w).iter().map(|v| v * v).sum::<f64>() / w.elem_count() as f64;
        assert!(
            (std.sqrt() - 0.2).abs() < 0.05,
            "initializer_range 0.2, got {}",
            std.sqrt()
        );
        assert!(to64(&m.store.get(&format!("{l}.bias")).unwrap())
            .iter()
            .all(|v| *v == 0.0));

        // One forward/backward (with dropout) reaches every parameter of task_specs.
        let b = finetune_batch(&pb, head);
        let mut rng = tandem::model::dropout::DropoutStream::new(&[1]);
        let out = m.forward(&b, &mut Some(&mut rng)).unwrap();
        let grads = out.loss_sum.backward().unwrap();
        let mut flat = vec![0f32; m.store.numel()];
        m.store.accumulate_grads(&grads, &mut flat).unwrap();
        assert_eq!(m.store.specs().len(), names.len());
        let cfg = m.cfg.extra["architectures"][0].clone();
        assert_eq!(cfg, head.architecture());
    }
    // The same from a model in memory.
    let (a, _) = TaskModel::from_pretrained_encoder(&dir, SEQ, 5, &Device::Cpu).unwrap();
    let (b, _) = TaskModel::from_pretrain_store(&pre.cfg, &pre.store, SEQ, 5).unwrap();
    assert_eq!(
        a.store.fingerprint().unwrap(),
        b.store.fingerprint().unwrap()
    );
}

#[test]
fn from_a_base_model_checkpoint_without_prefix() {
    let (m, report) =
        TaskModel::from_pretrained_encoder(&fixture("bert_tiny_base_only"), TOK, 1, &Device::Cpu)
            .unwrap();
    assert_eq!(report.initialised, ["classifier.bias", "classifier.weight"]);
    assert!(
        report.ignored.iter().any(|n| n.contains("pooler")),
        "{report:?}"
    );
    let (pre, _) = PretrainModel::load(&fixture("bert_tiny"), 0, &Device::Cpu).unwrap();
    let w = "bert.encoder.layer.1.output.dense.weight";
    assert_eq!(
        to64(&m.store.get(w).unwrap()),
        to64(&pre.store.get(w).unwrap())
    );
}

// ------------------------------------------------------------- finite differences

#[test]
fn head_gradients_match_finite_differences() {
    let mut cfg = BertConfig::new(30, 8, 1, 2, 16);
    cfg.max_position_embeddings = 12;
    cfg.initializer_range = 0.3;
    let pb = PretrainBatch {
        batch: 3,
        seq: 7,
        input_ids: vec![
            2, 5, 6, 7, 3, 8, 3, 2, 9, 10, 3, 11, 3, 0, 2, 12, 13, 14, 15, 3, 0,
        ],
        token_type_ids: vec![
            0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0,
        ],
        attention_mask: vec![
            1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0,
        ],
        mlm_labels: vec![],
        nsp_labels: vec![],
    };
    for head in [SEQ, TOK, QA] {
        let m = TaskModel::new(&cfg, head, 21, &Device::Cpu).unwrap();
        let b = finetune_batch(&pb, head);
        let (_, grad) = loss_and_grads(&m, &b);
        let loss_of = |m: &TaskModel| {
            let out = m.forward(&b, &mut None).unwrap();
            scalar(&out.loss_sum) / out.count as f64
        };
        let base = m.store.to_flat().unwrap();
        let eps = 1e-2f32;
        let mut checked = 0;
        let mut by_name = BTreeMap::new();
        for (i, spec) in m.store.specs().iter().enumerate() {
            let r = m.store.range(i);
            let (k, g) = grad[r.clone()]
                .iter()
                .enumerate()
                .fold(
                    (0, 0f32),
                    |a, (k, g)| {
                        if g.abs() > a.1.abs() {
                            (k, *g)
                        } else {
                            a
                        }
                    },
                );
            if g.abs() < 1e-3 {
                // Zero in exact arithmetic: the key bias (softmax over keys is shift-invariant)
                // and, for QA, everything that shifts all positions' logits alike (the output
                // bias and the last LayerNorm's bias), as the softmax runs over positions.
                let qa_shift = head == QA
                    && (spec.name == "qa_outputs.bias"
                        || spec.name == "bert.encoder.layer.0.output.LayerNorm.bias");
                assert!(
                    spec.name.contains("attention.self.key.bias") || qa_shift,
                    "{} has no gradient",
                    spec.name
                );
                continue;
            }
            let mut p = base.clone();
            p[r.start + k] += eps;
            m.store.set_from_flat(&p).unwrap();
            let up = loss_of(&m);
            p[r.start + k] -= 2.0 * eps;
            m.store.set_from_flat(&p).unwrap();
            let down = loss_of(&m);
            let num = (up - down) / (2.0 * eps as f64);
            let err = (num - g as f64).abs();
            assert!(
                err <= 2e-2 * num.abs() + 2e-4,
                "{head:?} {}[{k}]: analytic {g}, numeric {num}",
                spec.name
            );
            by_name.insert(spec.name.clone(), num);
            checked += 1;
        }
        m.store.set_from_flat(&base).unwrap();
        assert!(checked >= 15, "{head:?}: checked only {checked} tensors");
        let w = format!("{}.weight", head.layer_name());
        assert!(by_name.contains_key(&w), "{head:?}: head checked");
    }
}

#[test]
fn dropout_changes_training_logits_only() {
    let (m, _) = TaskModel::load(&fixture("seqcls_tiny"), 0, &Device::Cpu).unwrap();
    let e = read_json(&fixture("seqcls_tiny/expected.json"));
    let b = batch_from_json(&e["batch"]);
    let eval = to64(&m.logits(&b).unwrap());
    let mut rng = tandem::model::dropout::DropoutStream::new(&[3]);
    let train = to64(&m.forward(&b, &mut Some(&mut rng)).unwrap().logits);
    assert!(max_rel(&train, &eval) > 1e-3);
    let mut rng = tandem::model::dropout::DropoutStream::new(&[3]);
    let again = to64(&m.forward(&b, &mut Some(&mut rng)).unwrap().logits);
    assert_eq!(train, again, "dropout is reproducible from its seed");
}

#[test]
fn every_head_runs_in_bf16_mixed_precision_close_to_f32() {
    for (i, (kind, head, _)) in ROUNDTRIP.into_iter().enumerate() {
        let mut m = roundtrip_model(head, 100 + i as u64);
        let b = roundtrip_batch(head);
        let f32_out = m.forward(&b, &mut None).unwrap();
        m.set_precision(tandem::model::Precision::Bf16);
        let bf16_out = m.forward(&b, &mut None).unwrap();
        // Logits come out as f32 whatever the precision (losses and argmax run there).
        assert_eq!(bf16_out.logits.dtype(), DType::F32, "{kind}");
        let (l32, l16) = (scalar(&f32_out.loss_sum), scalar(&bf16_out.loss_sum));
        assert!(
            l32 != l16 && (l16 - l32).abs() / l32 < 2e-2,
            "{kind}: f32 {l32} bf16 {l16}"
        );
    }
}
