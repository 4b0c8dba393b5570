//! Parity with transformers' `BertForPreTraining` (fixtures from
//! tests/fixtures/make_bert_fixtures.py, committed with their values).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use tandem::data::batch::PretrainBatch;
use tandem::model::hf;
use tandem::model::PretrainModel;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("bert_tiny/expected.json")).unwrap())
        .unwrap()
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        _ => panic!("not numeric: {v}"),
    }
}

fn assert_close(name: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{name}[{i}]: tandem {g}, transformers {w} (scale {scale})"
        );
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-parity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn losses_and_logits_match_transformers() {
    let (m, report) = PretrainModel::load(&fixture("bert_tiny"), 0, &Device::Cpu).unwrap();
    assert!(report.initialised.is_empty(), "{:?}", report.initialised);
    let batch = PretrainBatch::from_json_file(&fixture("bert_tiny/batch.json")).unwrap();
    let e = expected();
    let r = tandem::eval::eval_batch(&m, &batch, false).unwrap();
    for (k, v) in [
        ("mlm_loss", r.mlm_loss.unwrap()),
        ("nsp_loss", r.nsp_loss.unwrap()),
        ("loss", r.loss),
    ] {
        let w = e[k].as_f64().unwrap();
        assert!(
            (v - w).abs() <= 1e-4 * w.abs(),
            "{k}: tandem {v}, transformers {w}"
        );
    }
    let (mlm, nsp) = m.model.logits(&batch).unwrap();
    let to64 = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect::<Vec<_>>()
    };
    assert_close(
        "prediction_logits",
        &to64(&mlm),
        &flat(&e["prediction_logits"]),
        1e-4,
    );
    assert_close(
        "seq_relationship_logits",
        &to64(&nsp),
        &flat(&e["seq_relationship_logits"]),
        1e-4,
    );
}

#[test]
fn gradient_norms_match_transformers() {
    let (m, _) = PretrainModel::load(&fixture("bert_tiny"), 0, &Device::Cpu).unwrap();
    let batch = PretrainBatch::from_json_file(&fixture("bert_tiny/batch.json")).unwrap();
    let e = expected();
    let r = tandem::eval::eval_batch(&m, &batch, true).unwrap();
    let total = e["grad_norm"].as_f64().unwrap();
    assert!((r.grad_norm.unwrap() - total).abs() <= 1e-3 * total);
    let want = e["grad_norms"].as_object().unwrap();
    let got = r.grad_norms.unwrap();
    assert_eq!(
        got.len(),
        want.len(),
        "same parameter set as named_parameters()"
    );
    for (name, w) in want {
        let w = w.as_f64().unwrap();
        let g = *got
            .get(name)
            .unwrap_or_else(|| panic!("tandem has no gradient for {name}"));
        // The attention key bias has an exactly-zero gradient in exact arithmetic (softmax
        // is shift-invariant per query); both sides then hold rounding noise (~1e-7), so a
        // gradient below 1e-6 of the total is compared absolutely.
        let ok = (g - w).abs() <= 1e-3 * w.abs() || (w < 1e-6 * total && g < 1e-6 * total);
        assert!(ok, "grad norm of {name}: tandem {g}, transformers {w}");
    }
}

#[test]
fn base_model_checkpoint_loads_with_heads_initialised() {
    let (full, _) = PretrainModel::load(&fixture("bert_tiny"), 0, &Device::Cpu).unwrap();
    let (base, report) =
        PretrainModel::load(&fixture("bert_tiny_base_only"), 0, &Device::Cpu).unwrap();
    let mut init = report.initialised.clone();
    init.sort();
    assert_eq!(
        init,
        [
            "cls.predictions.bias",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.dense.weight",
            "cls.seq_relationship.bias",
            "cls.seq_relationship.weight",
        ]
    );
    let a = full.store.tensors();
    for (name, t) in base.store.tensors() {
        if name.starts_with("bert.") {
            let d = (t - &a[&name])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{name} loaded from the BertModel checkpoint");
        }
    }
}

#[test]
fn save_then_load_round_trips_exactly_and_keeps_hf_names() {
    let (m, _) = PretrainModel::load(&fixture("bert_tiny"), 0, &Device::Cpu).unwrap();
    let dir = tmp("roundtrip");
    m.save(&dir).unwrap();
    let (back, report) = PretrainModel::load(&dir, 1, &Device::Cpu).unwrap();
    assert!(report.initialised.is_empty());
    assert_eq!(
        m.store.fingerprint().unwrap(),
        back.store.fingerprint().unwrap()
    );
    let names: Vec<String> = hf::read_tensors(&dir).unwrap().into_keys().collect();
    assert!(names.contains(&"bert.encoder.layer.1.attention.self.query.weight".to_string()));
    assert!(names.contains(&"cls.predictions.bias".to_string()));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForPreTraining");
    assert_eq!(cfg["model_type"], "bert");
    assert_eq!(
        cfg["transformers_version"], "5.24.0",
        "unknown keys are kept"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn write_checkpoint(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture("bert_tiny/config.json"), dir.join("config.json")).unwrap();
    let mut t = hf::read_tensors(&fixture("bert_tiny")).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

#[test]
fn wrong_shape_and_unknown_tensors_are_named() {
    let dir = tmp("badshape");
    write_checkpoint(&dir, |t| {
        t.insert(
            "bert.pooler.dense.weight".into(),
            Tensor::zeros((32, 31), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = PretrainModel::load(&dir, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("bert.pooler.dense.weight") && e.contains("[32, 32]") && e.contains("[32, 31]"),
        "{e}"
    );

    let dir2 = tmp("unknown");
    write_checkpoint(&dir2, |t| {
        t.insert(
            "classifier.weight".into(),
            Tensor::zeros((3, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = PretrainModel::load(&dir2, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("classifier.weight") && e.contains("not a parameter"),
        "{e}"
    );

    let dir3 = tmp("missing");
    write_checkpoint(&dir3, |t| {
        t.remove("bert.encoder.layer.1.output.dense.weight");
    });
    let e = PretrainModel::load(&dir3, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing tensor `bert.encoder.layer.1.output.dense.weight`"),
        "{e}"
    );
    for d in [dir, dir2, dir3] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn legacy_names_and_tied_decoder_are_accepted() {
    let dir = tmp("legacy");
    write_checkpoint(&dir, |t| {
        let g = t.remove("bert.embeddings.LayerNorm.weight").unwrap();
        t.insert("bert.embeddings.LayerNorm.gamma".into(), g);
        let w = t["bert.embeddings.word_embeddings.weight"].clone();
        t.insert("cls.predictions.decoder.weight".into(), w);
        t.insert(
            "bert.embeddings.position_ids".into(),
            Tensor::arange(0u32, 40, &Device::Cpu)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap(),
        );
    });
    let (m, report) = PretrainModel::load(&dir, 0, &Device::Cpu).unwrap();
    assert!(report.initialised.is_empty());
    assert_eq!(report.ignored.len(), 2, "{:?}", report.ignored);
    let (full, _) = PretrainModel::load(&fixture("bert_tiny"), 0, &Device::Cpu).unwrap();
    assert_eq!(
        m.store.fingerprint().unwrap(),
        full.store.fingerprint().unwrap()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `tandem eval-batch --grads` on the fixture, with `TANDEM_FUSED_KERNELS` set to `fused`.
fn eval_batch_command(fused: &str) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .env("TANDEM_FUSED_KERNELS", fused)
        .args(["eval-batch", "--grads", "--checkpoint"])
        .arg(fixture("bert_tiny"))
        .arg("--batch")
        .arg(fixture("bert_tiny/batch.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn eval_batch_command_prints_hf_losses() {
    let v = eval_batch_command("1");
    let e = expected();
    for k in ["mlm_loss", "nsp_loss", "loss", "grad_norm"] {
        let (g, w) = (v[k].as_f64().unwrap(), e[k].as_f64().unwrap());
        assert!((g - w).abs() <= 1e-3 * w.abs(), "{k}: {g} vs {w}");
    }
    assert!(v["grad_norms"]["cls.predictions.bias"].as_f64().unwrap() > 0.0);
    assert_eq!(v["kernels"], "fused-cpu");

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["eval-batch", "--checkpoint"])
        .arg(fixture("bert_tiny"))
        .arg("--batch")
        .arg(fixture("bert_tiny/config.json"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("config.json") && err.contains("invalid JSON"),
        "{err}"
    );
}

/// The composed path — differentiable candle ops instead of tandem's fused CPU kernels, the
/// path a CUDA device takes — against the same transformers fixtures, on this CPU.
#[test]
fn composed_ops_path_matches_transformers() {
    let v = eval_batch_command("0");
    assert_eq!(v["kernels"], "composed", "the switch must take effect");
    let e = expected();
    for k in ["mlm_loss", "nsp_loss", "loss"] {
        let (g, w) = (v[k].as_f64().unwrap(), e[k].as_f64().unwrap());
        assert!((g - w).abs() <= 1e-4 * w.abs(), "{k}: {g} vs {w}");
    }
    let total = e["grad_norm"].as_f64().unwrap();
    for (name, w) in e["grad_norms"].as_object().unwrap() {
        let w = w.as_f64().unwrap();
        let g = v["grad_norms"][name]
            .as_f64()
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let ok = (g - w).abs() <= 1e-3 * w.abs() || (w < 1e-6 * total && g < 1e-6 * total);
        assert!(ok, "grad norm of {name}: composed {g}, transformers {w}");
    }
}
