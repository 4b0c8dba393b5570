//! The training step: gradients against finite differences, micro-batch accumulation
//! against one large batch, a tiny model that learns a repetitive corpus, and bf16 mixed
//! precision against f32.

use candle_core::Device;
use rand::Rng;
use tandem::bench::synthetic_batch;
use tandem::comm::Local;
use tandem::data::batch::{PretrainBatch, IGNORE};
use tandem::model::{BertConfig, Precision, PretrainModel};
use tandem::train::step::{forward_backward, DEFAULT_BUCKET_ELEMS};
use tandem::train::{AdamWConfig, Decay, Schedule, StepOptions, Trainer};

fn tiny_cfg(vocab: usize, hidden: usize) -> BertConfig {
    let mut c = BertConfig::new(vocab, hidden, 2, 2, hidden * 2);
    c.max_position_embeddings = 32;
    c.initializer_range = 0.2;
    c
}

fn options(lr: f32, steps: u64, dropout: bool) -> StepOptions {
    StepOptions {
        adamw: AdamWConfig::default(),
        schedule: Schedule {
            peak_lr: lr,
            warmup_steps: steps / 10,
            total_steps: steps,
            decay: Decay::Linear,
        },
        max_grad_norm: 1.0,
        bucket_elems: DEFAULT_BUCKET_ELEMS,
        seed: 3,
        dropout,
        dropout_stream: None,
    }
}

fn loss_of(m: &PretrainModel, b: &PretrainBatch) -> f64 {
    let out = m.model.forward(b, &mut None).unwrap();
    out.mlm_sum.to_scalar::<f32>().unwrap() as f64 / out.mlm_count as f64
        + out.nsp_sum.to_scalar::<f32>().unwrap() as f64 / out.nsp_count as f64
}

#[test]
fn model_gradients_match_finite_differences() {
    let cfg = tiny_cfg(40, 16);
    let m = PretrainModel::new(&cfg, 11, &Device::Cpu).unwrap();
    let mut b = synthetic_batch(&cfg, 3, 10, 5);
    // Pad the end of the last sequence, so the attention mask is exercised.
    for j in 7..10 {
        b.attention_mask[2 * 10 + j] = 0;
        b.mlm_labels[2 * 10 + j] = IGNORE;
    }
    let w = (1.0 / b.mlm_count() as f64, 1.0 / b.nsp_count() as f64);
    let mut grad = vec![0f32; m.store.numel()];
    forward_backward(&m, &b, w, None, grad.as_mut_slice()).unwrap();
    let base = m.store.to_flat().unwrap();
    let eps = 1e-2f32;
    let mut checked = 0;
    for (i, spec) in m.store.specs().iter().enumerate() {
        let r = m.store.range(i);
        // The coordinate with the largest gradient in each tensor (the key bias's gradient
        // is zero in exact arithmetic, so it has none worth checking).
        let (k, g) = grad[r.clone()]
            .iter()
            .enumerate()
            .fold(
                (0, 0f32),
                |a, (k, g)| if g.abs() > a.1.abs() { (k, *g) } else { a },
            );
        if g.abs() < 1e-3 {
            assert!(
                spec.name.contains("attention.self.key.bias"),
                "{} has no gradient",
                spec.name
            );
            continue;
        }
        let mut p = base.clone();
        p[r.start + k] += eps;
        m.store.set_from_flat(&p).unwrap();
        let up = loss_of(&m, &b);
        p[r.start + k] -= 2.0 * eps;
        m.store.set_from_flat(&p).unwrap();
        let down = loss_of(&m, &b);
        let num = (up - down) / (2.0 * eps as f64);
        let err = (num - g as f64).abs();
        assert!(
            err <= 2e-2 * num.abs() + 2e-4,
            "{}[{k}]: analytic {g}, numeric {num}",
            spec.name
        );
        checked += 1;
    }
    m.store.set_from_flat(&base).unwrap();
    assert!(checked >= 30, "checked only {checked} tensors");
}

#[test]
fn micro_batch_accumulation_equals_one_large_batch() {
    let cfg = tiny_cfg(50, 16);
    let mut one = Trainer::new(
        PretrainModel::new(&cfg, 1, &Device::Cpu).unwrap(),
        options(1e-3, 10, false),
    )
    .unwrap();
    let mut two = Trainer::new(
        PretrainModel::new(&cfg, 1, &Device::Cpu).unwrap(),
        options(1e-3, 10, false),
    )
    .unwrap();
    for step in 0..4 {
        let a = synthetic_batch(&cfg, 2, 12, 100 + step);
        let b = synthetic_batch(&cfg, 3, 12, 200 + step);
        let mut ab = a.clone();
        ab.batch += b.batch;
        ab.input_ids.extend(&b.input_ids);
        ab.token_type_ids.extend(&b.token_type_ids);
        ab.attention_mask.extend(&b.attention_mask);
        ab.mlm_labels.extend(&b.mlm_labels);
        ab.nsp_labels.extend(&b.nsp_labels);
        let s1 = one.train_step(&[ab], &mut Local).unwrap();
        let s2 = two.train_step(&[a, b], &mut Local).unwrap();
        assert!(
            (s1.loss - s2.loss).abs() <= 1e-5 * s1.loss,
            "step {step}: {} vs {}",
            s1.loss,
            s2.loss
        );
        assert_eq!(s1.mlm_tokens, s2.mlm_tokens);
    }
    let p1 = one.model.store.to_flat().unwrap();
    let p2 = two.model.store.to_flat().unwrap();
    let worst = p1
        .iter()
        .zip(&p2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "parameters differ by {worst}");
}

/// Four documents of six fixed sentences each, every document with its own words; NotNext
/// pairs take B from another document (as BERT's random segments come from other documents).
/// After a few hundred steps a tiny model predicts masked tokens and IsNext/NotNext far
/// better than at the start.
fn repetitive_batch(rng: &mut impl Rng, vocab: u32, batch: usize) -> PretrainBatch {
    const LEN: usize = 7;
    let words = (vocab - 5) / 4;
    let sentence = |i: usize| -> Vec<u32> {
        let doc = (i / 6) as u32;
        (0..LEN)
            .map(|j| 5 + doc * words + ((i * 7 + j * 3) as u32 % words))
            .collect()
    };
    let seq = 2 * LEN + 3;
    let mut out = PretrainBatch {
        batch,
        seq,
        input_ids: vec![],
        token_type_ids: vec![],
        attention_mask: vec![1; batch * seq],
        mlm_labels: vec![],
        nsp_labels: vec![],
    };
    for _ in 0..batch {
        let (doc, i) = (rng.random_range(0..4), rng.random_range(0..5));
        let a = doc * 6 + i;
        let is_next = rng.random_bool(0.5);
        let b = if is_next {
            a + 1
        } else {
            ((doc + rng.random_range(1..4)) % 4) * 6 + rng.random_range(0..6)
        };
        let mut ids = vec![2];
        ids.extend(sentence(a));
        ids.push(3);
        ids.extend(sentence(b));
        ids.push(3);
        let mut types = vec![0u32; LEN + 2];
        types.extend(vec![1u32; LEN + 1]);
        let mut labels = vec![IGNORE; seq];
        for j in 0..seq {
            if ids[j] > 4 && rng.random_bool(0.15) {
                labels[j] = ids[j] as i64;
                let r: f64 = rng.random();
                ids[j] = if r < 0.8 {
                    4
                } else if r < 0.9 {
                    rng.random_range(5..vocab)
                } else {
                    ids[j]
                };
            }
        }
        out.input_ids.extend(ids);
        out.token_type_ids.extend(types);
        out.mlm_labels.extend(labels);
        out.nsp_labels.push(u32::from(!is_next));
    }
    out
}

#[test]
fn tiny_model_learns_a_repetitive_corpus() {
    let mut cfg = tiny_cfg(48, 32);
    cfg.initializer_range = 0.02;
    let steps = 500;
    let mut t = Trainer::new(
        PretrainModel::new(&cfg, 7, &Device::Cpu).unwrap(),
        options(5e-3, steps, true),
    )
    .unwrap();
    let mut rng = tandem::util::rng(&[42]);
    let mut log = vec![];
    for _ in 0..steps {
        let b = repetitive_batch(&mut rng, 48, 16);
        log.push(t.train_step(&[b], &mut Local).unwrap());
    }
    let mean = |s: &[tandem::train::StepStats], f: fn(&tandem::train::StepStats) -> f32| {
        s.iter().map(f).sum::<f32>() / s.len() as f32
    };
    let (first, last) = (&log[..10], &log[log.len() - 20..]);
    let (m0, m1) = (mean(first, |s| s.mlm_loss), mean(last, |s| s.mlm_loss));
    let (n0, n1) = (mean(first, |s| s.nsp_loss), mean(last, |s| s.nsp_loss));
    assert!(m1 < 0.5 * m0, "MLM loss {m0} → {m1}");
    assert!(n1 < 0.5 * n0, "NSP loss {n0} → {n1}");
    assert!(
        mean(last, |s| s.mlm_accuracy) > 0.6,
        "MLM accuracy {}",
        mean(last, |s| s.mlm_accuracy)
    );
    assert!(log.iter().all(|s| s.grad_norm.is_finite()));
}

#[test]
fn a_batch_without_labels_still_gives_every_parameter_a_gradient() {
    let cfg = tiny_cfg(40, 16);
    let m = PretrainModel::new(&cfg, 11, &Device::Cpu).unwrap();
    let mut b = synthetic_batch(&cfg, 2, 8, 5);
    b.mlm_labels.iter_mut().for_each(|l| *l = IGNORE);
    let mut grad = vec![0f32; m.store.numel()];
    // Errors if any parameter (e.g. cls.predictions.bias) got no gradient at all.
    forward_backward(
        &m,
        &b,
        (0.0, 1.0 / b.nsp_count() as f64),
        None,
        grad.as_mut_slice(),
    )
    .unwrap();
    let mlm_bias = m
        .store
        .specs()
        .iter()
        .position(|s| s.name == "cls.predictions.bias")
        .unwrap();
    assert!(grad[m.store.range(mlm_bias)].iter().all(|g| *g == 0.0));
}

/// Flat cosine similarity and norm ratio of two gradients.
fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (norm(a) * norm(b)), norm(b) / norm(a))
}

#[test]
fn bf16_mixed_precision_tracks_f32_on_one_batch() {
    let cfg = tiny_cfg(40, 16);
    let mut b = synthetic_batch(&cfg, 4, 12, 5);
    for j in 9..12 {
        b.attention_mask[3 * 12 + j] = 0;
        b.mlm_labels[3 * 12 + j] = IGNORE;
    }
    let w = (1.0 / b.mlm_count() as f64, 1.0 / b.nsp_count() as f64);
    let run = |p: Precision| {
        let mut m = PretrainModel::new(&cfg, 11, &Device::Cpu).unwrap();
        m.set_precision(p);
        let mut grad = vec![0f32; m.store.numel()];
        let s = forward_backward(&m, &b, w, None, grad.as_mut_slice()).unwrap();
        (s.mlm_sum * w.0 + s.nsp_sum * w.1, grad, m)
    };
    let (l32, g32, _) = run(Precision::F32);
    let (l16, g16, m16) = run(Precision::Bf16);
    assert_ne!(l16, l32, "bf16 must actually compute in bf16");
    assert!((l16 - l32).abs() / l32 < 1e-2, "loss f32 {l32} bf16 {l16}");
    let (cos, ratio) = compare(&g32, &g16);
    assert!(
        cos > 0.99 && (ratio - 1.0).abs() < 0.05,
        "cos {cos} norm ratio {ratio}"
    );
    // Every tensor's gradient arrives through the casts and points the same way (tensors
    // whose true gradient is ~0, as the attention key bias's, are noise on both sides).
    let total = g32.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    for (i, spec) in m16.store.specs().iter().enumerate() {
        let r = m16.store.range(i);
        let part = g32[r.clone()]
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        if part > 1e-4 * total {
            let (cos, _) = compare(&g32[r.clone()], &g16[r]);
            assert!(cos > 0.95, "{}: gradient cosine {cos}", spec.name);
        }
    }
}

#[test]
fn bf16_mixed_precision_learns_like_f32() {
    let mut cfg = tiny_cfg(48, 32);
    cfg.initializer_range = 0.02;
    let steps = 300;
    let train = |p: Precision| {
        let mut m = PretrainModel::new(&cfg, 7, &Device::Cpu).unwrap();
        m.set_precision(p);
        let mut t = Trainer::new(m, options(5e-3, steps, true)).unwrap();
        let mut rng = tandem::util::rng(&[42]);
        (0..steps)
            .map(|_| {
                let b = repetitive_batch(&mut rng, 48, 16);
                t.train_step(&[b], &mut Local).unwrap().loss
            })
            .collect::<Vec<f32>>()
    };
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (f32_log, bf16_log) = (train(Precision::F32), train(Precision::Bf16));
    let (first, last) = (
        mean(&bf16_log[..10]),
        mean(&bf16_log[steps as usize - 20..]),
    );
    let last_f32 = mean(&f32_log[steps as usize - 20..]);
    assert!(last < 0.7 * first, "bf16 loss {first} → {last}");
    assert!(
        (last - last_f32).abs() < 0.05 * last_f32,
        "bf16 ends at {last}, f32 at {last_f32}"
    );
}
